"""The fine-tuning victim: a causal LM fine-tuned on members drawn from a corpus's private split.

Members and non-members are one seeded random halving of texts drawn from the same split and length range, so
neither length nor corpus order tells them apart (both checked with a two-sample KS test and recorded).
Optional canaries ``"<prefix> dddd-dddd"`` (random digits) are inserted k times each into the training set.
Training is full fine-tuning or LoRA (peft, merged before saving), optionally DP-SGD through Opacus: Poisson
sampling at rate q = B/N, per-sample clipping to C, noise σ from Opacus's RDP search for the target ε at δ,
and ε as reported by Opacus's RDP accountant over the steps actually taken. The fine-tune is saved as a plain
Hugging Face folder; the Secret (members, non-members, canaries) goes beside it, never into it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.io import atomic_write_json
from leaklab.metrics.membership import length_shift
from leaklab.models.causal import CausalLM, encode_texts, load_causal_lm, pad_batch, sample_losses

RECORD = "leaklab_finetune.json"
Progress = Callable[[str, int, int], None]
EpochHook = Callable[[int, nn.Module, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainOptions(Config):
    """How a causal LM is trained (victim and shadow models share it)."""

    owner: ClassVar[str] = "training"
    method: Literal["full", "lora"] = option("full", "full fine-tuning or LoRA adapters (merged when saved)")
    epochs: int = option(3, "passes over the training texts")
    lr: float | None = option(None, "AdamW learning rate (default: 5e-5 full, 1e-3 LoRA)")
    batch_size: int = option(16, "texts per step (DP: expected texts per Poisson-sampled step)")
    lora_r: int = option(16, "LoRA rank (method=lora)")
    epsilon: float | None = option(None, "DP-SGD target ε (Opacus); None: no DP")
    delta: float = option(1e-5, "DP δ")
    clip: float = option(1.0, "DP per-sample gradient bound C")
    seed: int = option(0, "seed of shuffling, LoRA init, Poisson sampling and DP noise")

    def __post_init__(self) -> None:
        self.require(positive=("epochs", "batch_size", "lora_r", "clip"))
        if self.lr is not None and not self.lr > 0:
            raise LeaklabError(f"lr must be > 0, got {self.lr}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise LeaklabError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise LeaklabError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.method == "full" else 1e-3)


@dataclass(frozen=True)
class FinetuneConfig(TrainOptions):
    """The victim: which model, which members, which canaries, and how it is trained."""

    owner: ClassVar[str] = "lm finetune"
    model: str = option("smollm2-135m", "packaged causal LM or Hugging Face folder to fine-tune")
    corpus: str = option("rotten-tomatoes", "corpus whose private split gives members and non-members")
    members: int = option(500, "member texts (trained on)")
    non_members: int | None = option(None, "held-out texts of the same split and lengths (default: = members)")
    min_tokens: int = option(4, "shortest text, in tokens")
    max_tokens: int = option(32, "longest text, in tokens")
    canary_repeats: str = option("", "comma list of insertion counts k, e.g. 1,4,16 (empty: no canaries)")
    canaries_per_repeat: int = option(4, "canaries inserted at each k")
    canary_digits: int = option(8, "random digits of each canary's secret (the format's space is 10^digits)")
    canary_prefix: str = option(
        "{owner}'s account number is",
        "text before each canary's secret; {owner} becomes a different first name per canary (without it, every "
        "canary shares the prefix and prompting can return only one secret)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(positive=("members", "canaries_per_repeat", "canary_digits"))
        if self.non_members is not None and self.non_members < 1:
            raise LeaklabError(f"non_members must be >= 1, got {self.non_members}")
        _ = self.repeats  # validates the list

    @property
    def repeats(self) -> tuple[int, ...]:
        try:
            ks = tuple(int(x) for x in self.canary_repeats.replace(" ", "").split(",") if x)
        except ValueError:
            raise LeaklabError(
                f"canary_repeats must be a comma list of integers, got '{self.canary_repeats}'"
            ) from None
        if any(k < 1 for k in ks):
            raise LeaklabError(f"canary repeats must be >= 1, got {self.canary_repeats}")
        return ks

    @property
    def n_non_members(self) -> int:
        return self.non_members if self.non_members is not None else self.members

    def training(self) -> TrainOptions:
        return TrainOptions(**{k: getattr(self, k) for k in TrainOptions.keys()})  # noqa: SIM118 (Config.keys: field names)


@dataclass(frozen=True)
class Canary:
    """A secret-format string inserted ``repeats`` times: ``prefix + " " + secret``."""

    prefix: str
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"


def format_digits(digits: str) -> str:
    """'48120937' → '4812-0937' (groups of four)."""
    return "-".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def random_secrets(n: int, digits: int, rng: np.random.Generator) -> list[str]:
    """``n`` secrets of the canary format drawn uniformly from its 10^digits space."""
    return [format_digits("".join(str(d) for d in rng.integers(0, 10, digits))) for _ in range(n)]


OWNERS = (
    "alice", "bruno", "chloe", "dmitri", "elena", "farid", "grace", "hiro", "ines", "jonas", "kavya", "liam",
    "maya", "nils", "olga", "pablo", "quinn", "rosa", "sami", "tara", "umar", "vera", "wei", "yusuf",
)  # fmt: skip


def canary_prefixes(template: str, n: int) -> list[str]:
    """``n`` prefixes: ``{owner}`` filled with a distinct name per canary, or the template itself for all."""
    if "{owner}" not in template:
        return [template] * n
    names = [OWNERS[i % len(OWNERS)] + (f" {i // len(OWNERS) + 1}" if i >= len(OWNERS) else "") for i in range(n)]
    return [template.replace("{owner}", name) for name in names]


def make_canaries(cfg: FinetuneConfig) -> list[Canary]:
    rng = np.random.default_rng([cfg.seed, 7])
    n = len(cfg.repeats) * cfg.canaries_per_repeat
    secrets = random_secrets(n, cfg.canary_digits, rng)
    ks = [k for k in cfg.repeats for _ in range(cfg.canaries_per_repeat)]
    prefixes = canary_prefixes(cfg.canary_prefix, n)
    return [Canary(p, s, k) for p, s, k in zip(prefixes, secrets, ks, strict=True)]


@dataclass(frozen=True)
class FinetuneSecret:
    """For scoring only: who was trained on. ``shift`` holds the KS tests between members and non-members."""

    members: tuple[str, ...]
    non_members: tuple[str, ...]
    canaries: tuple[Canary, ...] = ()
    canary_digits: int = 8
    shift: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneSecret:
        return cls(
            tuple(data["members"]),
            tuple(data["non_members"]),
            tuple(Canary(**c) for c in data.get("canaries", [])),
            int(data.get("canary_digits", 8)),
            dict(data.get("shift", {})),
        )


def secret_path(folder: str | Path) -> Path:
    """The Secret lives beside the model folder (``FOLDER.secret.json``), never inside what is shared."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".secret.json")


def load_secret(folder: str | Path) -> FinetuneSecret:
    path = secret_path(folder)
    if not path.is_file():
        raise LeaklabError(f"no Secret beside '{folder}' ({path.name}): was it written by 'leaklab lm finetune'?")
    return FinetuneSecret.from_dict(json.loads(path.read_text(encoding="utf-8")))


def membership_split(cfg: FinetuneConfig, lm: CausalLM) -> FinetuneSecret:
    """Members and held-out non-members: one seeded draw from the private split, randomly halved; the KS tests
    of token length and of corpus position between the halves are recorded."""
    from leaklab.corpora import load_corpus
    from leaklab.corpora.sampling import sample_texts

    corpus = load_corpus(cfg.corpus)
    n = cfg.members + cfg.n_non_members
    sample = sample_texts(corpus, lm.tokenizer, n, cfg.seed, cfg.min_tokens, cfg.max_tokens, "private")
    members, non = sample.texts[: cfg.members], sample.texts[cfg.members :]
    position = {t: i for i, t in enumerate(corpus.texts)}
    lengths = [len(x) for x in sample.token_ids]
    shift = {
        "length": length_shift(lengths[: cfg.members], lengths[cfg.members :]),
        "order": length_shift([position[t] for t in members], [position[t] for t in non]),
    }
    return FinetuneSecret(tuple(members), tuple(non), tuple(make_canaries(cfg)), cfg.canary_digits, shift)


def training_texts(secret: FinetuneSecret) -> list[str]:
    """Members plus each canary repeated k times."""
    return list(secret.members) + [c.text for c in secret.canaries for _ in range(c.repeats)]


# ---------------------------------------------------------------------------------------------------- training


def _with_lora(model: nn.Module, opts: TrainOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(opts.seed)
    config = LoraConfig(r=opts.lora_r, lora_alpha=2 * opts.lora_r, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def train_causal_lm(
    lm: CausalLM,
    texts: Sequence[str],
    opts: TrainOptions,
    progress: Progress | None = None,
    *,
    checkpoint: Path | None = None,
    on_epoch: EpochHook | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``lm.model`` in place on ``texts`` (mean over texts of each text's mean token NLL); returns the
    trained model (LoRA merged) and the training record (seconds per epoch, final loss, DP accounting).

    ``checkpoint`` is a folder where the state after each epoch is kept (trained weights, optimiser, record; with
    DP also the sampling and noise random states and the accountant's ledger), so an interrupted run resumes at
    its last finished epoch with the same result; ``on_epoch(epoch, model, record)`` is called after each epoch of
    a non-DP run (e.g. to save the model as it was after ``epoch`` epochs)."""
    if opts.epsilon is not None and on_epoch is not None:
        raise LeaklabError("DP fine-tuning has no per-epoch snapshots (its noise depends on the epochs)")
    model = _with_lora(lm.model, opts) if opts.method == "lora" else lm.model
    params = [p for n, p in model.named_parameters() if opts.method == "full" or "lora_" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    seqs = encode_texts(lm, texts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.start_id
    record: dict[str, Any] = {"texts": len(seqs), "params_trained": sum(p.numel() for p in params)}
    if opts.epsilon is not None:
        _dp_loop(model, params, seqs, pad, opts, record, progress, checkpoint)
    else:
        _plain_loop(model, params, seqs, pad, opts, record, progress, checkpoint, on_epoch)
    model.eval()
    if opts.method == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, record


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (LoRA-merged) copy of a model being trained, leaving the original untouched."""
    from peft import PeftModel

    out = copy.deepcopy(model)
    return out.merge_and_unload() if isinstance(out, PeftModel) else out


def _state_key(opts: TrainOptions, seqs: Sequence[Sequence[int]]) -> str:
    blob = json.dumps([opts.to_dict(), [list(s) for s in seqs]], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _load_checkpoint(
    folder: Path | None, key: str, model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict, dict] | None:
    """(record, extra state) saved after the last finished epoch (weights and optimiser restored), or None to
    start over."""
    if folder is None or not (folder / "state.json").is_file():
        return None
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if meta.get("key") != key:
        return None
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["trained"], strict=False)
    opt.load_state_dict(state["optimizer"])
    return meta["record"], state.get("extra", {})


def _save_checkpoint(
    folder: Path, key: str, model: nn.Module, opt: torch.optim.Optimizer, record: dict, extra: dict | None = None
) -> None:
    """Trained weights, optimiser state and ``extra`` (e.g. DP's random states and privacy ledger), then the record
    naming them (written last: a torn save is ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tmp = folder / "state.pt.tmp"
    torch.save({"trained": trained, "optimizer": opt.state_dict(), "extra": extra or {}}, tmp)
    tmp.replace(folder / "state.pt")
    atomic_write_json(folder / "state.json", {"key": key, "record": record})


LENGTH_GROUPS = 2


def batch_backward(model: nn.Module, batch: Sequence[Sequence[int]], pad: int, groups: int = LENGTH_GROUPS) -> float:
    """Backpropagate the batch's mean per-text loss and return it. The batch is cut into ``groups`` runs of
    similar length (each padded only to its own longest text) whose loss sums, divided by the batch size, add
    up to the same gradient as one padded pass over the whole batch, with fewer padded positions computed."""
    by_length = sorted(batch, key=len)
    n, total = len(by_length), 0.0
    for g in range(groups):
        part = by_length[g * n // groups : (g + 1) * n // groups]
        if part:
            loss = sample_losses(model, *pad_batch(part, pad)).sum() / n
            loss.backward()
            total += float(loss.detach())
    return total


def _plain_loop(model, params, seqs, pad, opts: TrainOptions, record, progress, checkpoint, on_epoch) -> None:
    opt = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(opts.seed)
    steps_per_epoch = math.ceil(len(seqs) / opts.batch_size)
    record["epoch_seconds"], record["epoch_loss"] = [], []
    key = _state_key(opts, seqs)
    saved = _load_checkpoint(checkpoint, key, model, opt)
    if saved is not None:
        record.update(saved[0])
    done = record["resumed_epochs"] = len(record["epoch_seconds"])
    for epoch in range(opts.epochs):
        order = rng.permutation(len(seqs))  # drawn for finished epochs too: the resumed run sees the same orders
        if epoch < done:
            continue
        start, losses = time.perf_counter(), []
        for s in range(steps_per_epoch):
            batch = [seqs[i] for i in order[s * opts.batch_size : (s + 1) * opts.batch_size]]
            losses.append(batch_backward(model, batch, pad))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if progress:
                progress("train", epoch * steps_per_epoch + s + 1, opts.epochs * steps_per_epoch)
        record["epoch_seconds"].append(time.perf_counter() - start)
        record["epoch_loss"].append(float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(epoch + 1, model, {**record, "steps": (epoch + 1) * steps_per_epoch})
        if checkpoint is not None and epoch + 1 < opts.epochs:
            _save_checkpoint(checkpoint, key, model, opt, record)
    record["steps"] = opts.epochs * steps_per_epoch


def _dp_loop(model, params, seqs, pad, opts: TrainOptions, record, progress, checkpoint=None) -> None:
    """DP-SGD: Poisson sampling at q = B/N, Opacus per-sample clipping and noise, RDP accounting per step. With
    ``checkpoint``, the state after each epoch (weights, optimiser, sampling and noise random states, the
    accountant's ledger) is kept there, so an interrupted run resumes at its last finished epoch."""
    import warnings

    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    from leaklab.defenses.dpsgd import noise_for_epsilon

    assert opts.epsilon is not None
    n = len(seqs)
    q = min(1.0, opts.batch_size / n)
    steps_per_epoch = max(1, round(1 / q))
    steps = opts.epochs * steps_per_epoch
    sigma = noise_for_epsilon(opts.epsilon, opts.delta, q, steps)
    accountant = RDPAccountant()
    rng = np.random.default_rng(opts.seed)
    noise = torch.Generator().manual_seed(opts.seed)
    record["epoch_seconds"], record["epoch_loss"] = [], []
    key = _state_key(opts, seqs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
        opt = DPOptimizer(
            torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.0),
            noise_multiplier=sigma,
            max_grad_norm=opts.clip,
            expected_batch_size=opts.batch_size,
            loss_reduction="mean",
            generator=noise,
        )
        opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        saved = _load_checkpoint(checkpoint, key, model, opt)
        if saved is not None:
            record.update(saved[0])
            rng.bit_generator.state = saved[1]["rng"]
            noise.set_state(saved[1]["noise"])
            accountant.history = [tuple(h) for h in saved[1]["history"]]
        done = record["resumed_epochs"] = len(record["epoch_seconds"])
        try:
            for epoch in range(done, opts.epochs):
                start, losses = time.perf_counter(), []
                for s in range(steps_per_epoch):
                    chosen = np.flatnonzero(rng.random(n) < q)
                    if len(chosen) == 0:  # an empty Poisson draw is still a step of the mechanism
                        accountant.step(noise_multiplier=sigma, sample_rate=q)
                        continue
                    loss = sample_losses(gsm, *pad_batch([seqs[i] for i in chosen], pad)).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    if progress:
                        progress("train (DP)", epoch * steps_per_epoch + s + 1, steps)
                record["epoch_seconds"].append(time.perf_counter() - start)
                record["epoch_loss"].append(float(np.mean(losses)) if losses else float("nan"))
                if checkpoint is not None and epoch + 1 < opts.epochs:
                    state = {"rng": rng.bit_generator.state, "noise": noise.get_state(), "history": accountant.history}
                    _save_checkpoint(checkpoint, key, model, opt, record, state)
        finally:
            gsm._close()
    record["steps"] = steps
    record["dp"] = {
        "target_epsilon": opts.epsilon,
        "epsilon": float(accountant.get_epsilon(delta=opts.delta)),
        "delta": opts.delta,
        "noise_multiplier": sigma,
        "sample_rate": q,
        "clip": opts.clip,
        "accounted_steps": sum(h[2] for h in accountant.history),
        "accountant": "opacus RDP",
    }


def save_causal_lm(model: nn.Module, tokenizer: Any, out: Path, record: dict[str, Any]) -> Path:
    """A plain Hugging Face folder (model, tokenizer) plus the training record, written to a temporary folder
    and renamed into place (an interrupted save leaves no half folder)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / RECORD, record)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def finetune(
    cfg: FinetuneConfig,
    out: str | Path,
    progress: Progress | None = None,
    *,
    snapshots: dict[int, str | Path] | None = None,
) -> dict[str, Any]:
    """Draw members and non-members, fine-tune, save the model folder at ``out`` and the Secret beside it.

    An interrupted run resumes at its last finished epoch (state kept in ``.OUT.resume`` beside ``out``, removed
    when done). ``snapshots`` maps an epoch e < cfg.epochs to a folder that receives the model as it was after e
    epochs, with its Secret and a record whose config says e epochs: the same model as a fine-tune run for e
    epochs (same seed, same shuffles, constant learning rate)."""
    out = Path(out)
    snapshots = {int(e): Path(f) for e, f in (snapshots or {}).items()}
    bad = [e for e in snapshots if not 0 < e < cfg.epochs]
    if bad:
        raise LeaklabError(f"snapshot epochs must be in 1..{cfg.epochs - 1}, got {bad[0]}")
    lm = load_causal_lm(cfg.model)
    secret = membership_split(cfg, lm)
    checkpoint = out.with_name(f".{out.name}.resume")

    def snapshot(epoch: int, model: nn.Module, record: dict[str, Any]) -> None:
        if epoch in snapshots:
            record = {**record, "snapshot_of_epochs": cfg.epochs}  # trained within the longer run: no own time
            _save_run(replace(cfg, epochs=epoch), secret, merged_copy(model), lm.tokenizer, snapshots[epoch], record)

    start = time.perf_counter()
    model, record = train_causal_lm(
        lm,
        training_texts(secret),
        cfg.training(),
        progress,
        checkpoint=checkpoint,
        on_epoch=snapshot if snapshots else None,
    )
    earlier = sum(record["epoch_seconds"][: record.get("resumed_epochs", 0)])  # epochs of an interrupted run
    record = _save_run(cfg, secret, model, lm.tokenizer, out, record, time.perf_counter() - start + earlier)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def _save_run(
    cfg: FinetuneConfig,
    secret: FinetuneSecret,
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    record: dict[str, Any],
    seconds: float | None = None,
) -> dict[str, Any]:
    """The model folder with its record (``seconds``: training time, default the epochs' sum) and the Secret."""
    trained = seconds if seconds is not None else float(sum(record["epoch_seconds"]))
    record = {"config": cfg.to_dict(), **record, "seconds": trained, "shift": secret.shift}
    atomic_write_json(secret_path(out), secret.to_dict())
    save_causal_lm(model, tokenizer, out, record)
    return record


def load_record(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
