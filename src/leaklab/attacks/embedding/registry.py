"""Registry and scenario of embedding attacks.

Each attack module registers in :data:`EMBED_ATTACKS` one ``attack(access, public, config) -> Prediction``
function with its typed options (a :class:`leaklab.core.Config`), the ``access`` it describes and the
``case`` of :mod:`leaklab.experiments.scenario` that builds its victim side. The attack receives only what its
threat model grants (:mod:`leaklab.attacks.embedding.access`: leaked vectors, a counting black-box encoder, a
search endpoint, leaked pairs, ...) and the public data; the runner
(:func:`leaklab.experiments.runner.run_embedding`) builds the victim from a :class:`Scenario`, calls the attack
and alone scores its prediction against the private texts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from leaklab.attacks.embedding.access import PublicData
from leaklab.core import Config, Registry, option
from leaklab.encoders import Encoder, load_encoder
from leaklab.errors import LeaklabError

C = TypeVar("C", bound=Config)


@dataclass
class Scenario:
    """Victim encoder, private targets and the attacker's public data, all fixed by ``seed``."""

    encoder: str = "minilm-l6"
    corpus: str = "rotten-tomatoes"
    n: int = 20
    seed: int = 0
    min_tokens: int = 1
    max_tokens: int = 32
    public_limit: int | None = None
    api_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        return d

    @cached_property
    def victim(self) -> Encoder:
        return load_encoder(self.encoder, api_key=self.api_key)

    @cached_property
    def tokenizer(self) -> Any:
        tok = getattr(self.victim, "tokenizer", None)
        if tok is None:
            from leaklab.models.registry import minilm_tokenizer

            tok = minilm_tokenizer()
        return tok

    @cached_property
    def corpus_obj(self) -> Any:
        from leaklab.corpora import load_corpus

        return load_corpus(self.corpus)

    def private(self, n: int | None = None, max_tokens: int | None = None) -> Any:
        """The victim's texts (private split, scoring only)."""
        from leaklab.corpora import sample_texts

        return sample_texts(
            self.corpus_obj,
            self.tokenizer,
            n or self.n,
            self.seed,
            self.min_tokens,
            max_tokens or self.max_tokens,
            split="private",
        )

    def check(self) -> None:
        """Load the victim encoder and draw the private targets and public texts once: what the user named fails
        here, before any attack runs."""
        self.private()
        self.public_texts()

    def public_texts(self, limit: int | None = None, max_tokens: int | None = None) -> list[str]:
        """The attacker's auxiliary texts: public-split texts within the length range, plus sentence chunks of
        longer public texts (never a private text), shuffled with ``seed``."""
        from leaklab.corpora.sampling import split_of

        max_tokens = max_tokens or self.max_tokens
        texts = [t for t in self.corpus_obj.texts if split_of(t) == "public"]
        lengths = [len(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        keep = [t for t, n in zip(texts, lengths, strict=True) if self.min_tokens <= n <= max_tokens]
        long = [t for t, n in zip(texts, lengths, strict=True) if n > max_tokens]
        chunks = [c for t in long for c in re.split(r"(?<=[.!?;])\s+", t) if len(c.split()) >= 3]
        if chunks:
            clen = [len(x) for x in self.tokenizer(chunks, add_special_tokens=False)["input_ids"]]
            private = {t for t in self.corpus_obj.texts if split_of(t) == "private"}
            seen = set(keep)
            for c, n in zip(chunks, clen, strict=True):
                if self.min_tokens <= n <= max_tokens and c not in private and c not in seen:
                    seen.add(c)
                    keep.append(c)
        rng = np.random.default_rng(self.seed + 7919)
        order = rng.permutation(len(keep))
        out = [keep[i] for i in order]
        limit = limit or self.public_limit
        if not out:
            raise LeaklabError(f"corpus '{self.corpus}' has no public text of {self.min_tokens}..{max_tokens} tokens")
        return out[:limit] if limit else out

    def extra_public_texts(self, corpora: str | list[str], any_length: bool = False) -> list[str]:
        """Public-split sentences (≥ 3 words, within the token range unless ``any_length``) of other corpora
        (comma-separated names): more attacker training text, never a private text of its own corpus or of the
        scenario's corpus."""
        from leaklab.corpora import load_corpus
        from leaklab.corpora.sampling import split_of

        names = [c.strip() for c in (corpora.split(",") if isinstance(corpora, str) else corpora) if c.strip()]
        private = {t for t in self.corpus_obj.texts if split_of(t) == "private"}
        out: dict[str, None] = {}
        for name in names:
            texts = [t for t in load_corpus(name).texts if split_of(t) == "public"]
            for sent in (c for t in texts for c in re.split(r"(?<=[.!?;])\s+", t.strip())):
                if len(sent.split()) >= 3 and sent not in private:
                    out[sent] = None
        sents = list(out)
        if any_length:
            return sents
        lengths = [len(x) for x in self.tokenizer(sents, add_special_tokens=False)["input_ids"]] if sents else []
        return [t for t, n in zip(sents, lengths, strict=True) if self.min_tokens <= n <= self.max_tokens]

    def public_data(self) -> PublicData:
        """What the attacker knows of the corpus: its public texts (drawn once), other corpora's public
        sentences, and the guard that keeps private-split texts out of what it generates."""
        from leaklab.corpora.sampling import split_of

        private = frozenset(t for t in self.corpus_obj.texts if split_of(t) == "private")
        return PublicData(
            self.corpus,
            self.tokenizer,
            self.seed,
            self.min_tokens,
            self.max_tokens,
            tuple(self.public_texts(limit=len(self.corpus_obj.texts) + 1)),
            self.public_limit,
            self.extra_public_texts,
            lambda texts: [t for t in texts if t not in private],
        )


def span_augment(
    texts: list[str], per_text: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Up to ``per_text`` new training texts per text: contiguous word spans (60%) and copies with words dropped
    (40%); texts of fewer than 4 words, repeats and anything in ``exclude`` (e.g. the private split) are skipped."""
    rng = np.random.default_rng(seed + 104729)
    seen, out = set(texts) | set(exclude), []
    for text in texts:
        w = text.split()
        if len(w) < 4:
            continue
        for _ in range(per_text):
            if rng.random() < 0.6:
                length = int(rng.integers(max(2, len(w) // 4), len(w)))
                start = int(rng.integers(0, len(w) - length + 1))
                cand = " ".join(w[start : start + length])
            else:
                cand = " ".join(x for x, keep in zip(w, rng.random(len(w)) > 0.25, strict=True) if keep)
            if len(cand.split()) >= 2 and cand not in seen:
                seen.add(cand)
                out.append(cand)
    return out


def victim_targets(scn: Scenario, max_tokens: int | None = None) -> tuple[Any, np.ndarray]:
    """The victim's private sample and its leaked vectors (victim side: not counted as attacker queries)."""
    sample = scn.private(max_tokens=max_tokens)
    return sample, scn.victim.embed(sample.texts)


def check_inverter_encoder(inverter: Any, folder: str, encoder: str, encoder_dim: int) -> None:
    """A saved inverter must invert the encoder's vectors: one clear error naming both dimensions otherwise."""
    dim = getattr(inverter, "dim", None)
    if dim is not None and dim != encoder_dim:
        raise LeaklabError(
            f"the inverter at '{folder}' inverts {dim}-d vectors but encoder '{encoder}' gives {encoder_dim}-d "
            "vectors: use one trained for this encoder"
        )


@dataclass(frozen=True)
class SavedInverter(Config):
    """Options of attacks whose inverter can be saved after training, or loaded instead of trained."""

    load: str | None = option(None, "folder of a saved inverter to use instead of training one")
    save: str | None = option(None, "folder to save the trained inverter to")

    def __post_init__(self) -> None:
        missing = [f for f in (INVERTER_CONFIG, INVERTER_WEIGHTS) if self.load and not (Path(self.load) / f).exists()]
        if missing:
            raise LeaklabError(f"option load='{self.load}' is not a saved inverter (no {' or '.join(missing)})")


def sub_config(cls: type[C], source: Config, **override: Any) -> C:
    """The config ``cls`` of a sub-attack from the same-named fields of ``source`` (``override`` wins)."""
    names = {f.name for f in fields(source)}
    return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if f.name in names} | override)


def at_least(cfg: Config, minimum: float, *names: str) -> None:
    """Refuse option values below ``minimum``: ``option probes=0: must be at least 1``."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise LeaklabError(f"option {name}={value!r}: must be at least {minimum}")


def load_or_train(
    encoder: Encoder,
    cfg: SavedInverter,
    load: Callable[[str], Any],
    train: Callable[[], tuple[Any, dict[str, Any]]],
) -> tuple[Any, dict[str, Any]]:
    """The inverter saved at option ``load`` (checked against ``encoder``), else a freshly trained one (saved to
    option ``save`` if given)."""
    if cfg.load:
        inv = load(cfg.load)
        check_inverter_encoder(inv, cfg.load, encoder.name, encoder.dim)
        return inv, {"loaded": cfg.load}
    inv, info = train()
    if cfg.save:
        inv.save(cfg.save)
    return inv, info


@dataclass
class AttackReport:
    """A scored embedding attack (:func:`leaklab.experiments.runner.run_embedding` makes it and turns it into a
    record): scores, what the attacker spent, and what it was allowed to know."""

    attack: str
    scenario: dict[str, Any]
    metrics: dict[str, Any]
    usage: dict[str, int]
    flags: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def examples(true: list[str], pred: list[str], k: int = 5) -> list[dict[str, str]]:
    """The first ``k`` (true, recovered) pairs, keyed as the gradient records' pairs."""
    return [{"true_text": t, "pred_text": p} for t, p in list(zip(true, pred, strict=True))[:k]]


BUILTIN_MODULES = (
    *("nearest", "whitebox", "bow", "decoder", "alignment", "kb", "clustering", "membership"),
    "kbsecrets",
)


def _load_builtin() -> None:
    """Import the built-in attack modules, listed explicitly (each registers its attack)."""
    import importlib

    for name in BUILTIN_MODULES:
        importlib.import_module(f"leaklab.attacks.embedding.{name}")


EMBED_ATTACKS: Registry[Callable[..., Any]] = Registry(
    "embedding attack", builtins=_load_builtin, entry_points="leaklab.attacks"
)


# ----------------------------------------------------------------------------- trained inverters on disk
INVERTER_WEIGHTS = "model.safetensors"
INVERTER_CONFIG = "config.json"


def save_inverter(folder: str | Path, kind: str, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (``kind`` recorded), each atomically."""
    from safetensors.torch import save_file

    from leaklab.io import atomic_write, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(folder / INVERTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / INVERTER_CONFIG, {"kind": kind, **config})
    return folder


def load_inverter_files(folder: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read back what :func:`save_inverter` wrote; a missing file or another kind is a clear error."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / INVERTER_CONFIG, folder / INVERTER_WEIGHTS
    if not cfg_path.exists() or not w_path.exists():
        raise LeaklabError(f"'{folder}' is not a saved inverter (needs {INVERTER_CONFIG} and {INVERTER_WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LeaklabError(f"{cfg_path}: not valid JSON ({exc})") from None
    if config.get("kind") != kind:
        raise LeaklabError(f"'{folder}' holds a '{config.get('kind')}' inverter, not a '{kind}' one")
    return load_file(str(w_path)), config
