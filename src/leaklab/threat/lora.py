"""Victim side, LoRA (peft): only the adapter matrices train, and only their gradients or deltas are shared.

With W' = W + (α/r)·B·A, peft initialises A at random (Kaiming-uniform) and B = 0, so at the first step
∂L/∂A = 0 and only ∂L/∂B carries signal. The target modules are the attention projections the family
adapter finds (no name whitelist); the Observation's ``meta["lora"]`` records r, α, the target modules and
the seed of A's initialisation (and, in a later federated round, the file of the global adapter
weights), so an attacker rebuilds the identical adapted model with :func:`lora_model`. For classification
the seeded head stays frozen as well (no ``modules_to_save``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.io import cache_dir
from leaklab.models.registry import LoadedModel, ModelRef, load_model
from leaklab.threat.local import ClientHook, TextObjective, client_step, package, text_batch
from leaklab.threat.observation import Observation, Secret, ThreatFlags

TARGETS = {"attention": "qkv", "qv": "qv", "q": "q"}


@dataclass(frozen=True)
class LoraSpec:
    """Adapter shape: rank r, scale α, which attention projections, and the seed of A's random init."""

    r: int = 8
    alpha: int = 16
    targets: str = "attention"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.targets not in TARGETS:
            raise UnknownNameError("LoRA target set", self.targets, list(TARGETS))
        if self.r < 1:
            raise LeaklabError(f"LoRA rank must be >= 1, got {self.r}")

    def meta(self, loaded: LoadedModel) -> dict[str, Any]:
        modules, transposed = target_modules(loaded, self.targets)
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": 0.0,
            "targets": self.targets,
            "target_modules": modules,
            "fan_in_fan_out": transposed,
            "init_seed": self.init_seed,
        }


def target_modules(loaded: LoadedModel, targets: str) -> tuple[list[str], bool]:
    """Module names of the chosen attention projections in every layer (fused QKV counted once)."""
    names: list[str] = []
    transposed = False
    for layer in loaded.adapter.projections:
        for key, proj in layer:
            if key in TARGETS[targets]:
                name = proj.param.removesuffix(".weight")
                transposed = transposed or proj.transposed
                if name not in names:
                    names.append(name)
    return names, transposed


_LORA: dict[tuple[ModelRef, str], nn.Module] = {}


def lora_model(ref: ModelRef, meta: dict[str, Any]) -> nn.Module:
    """The adapted model a LoRA update refers to (memoised, eval mode; rebuilt identically from the meta)."""
    key = (ref, json.dumps(meta, sort_keys=True))
    if key in _LORA:
        return _LORA[key]
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(load_model(ref).model)
    config = LoraConfig(
        r=meta["r"],
        lora_alpha=meta["alpha"],
        lora_dropout=meta["dropout"],
        target_modules=list(meta["target_modules"]),
        fan_in_fan_out=meta["fan_in_fan_out"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(meta["init_seed"])
        model = get_peft_model(base, config)
    if meta.get("adapter_weights"):  # a later federated round: the global adapter, not the seeded init
        _load_adapter(model, meta["adapter_weights"])
    model.eval()
    _LORA[key] = model
    return model


def merged_ref(ref: ModelRef, meta: dict[str, Any]) -> ModelRef:
    """The model a LoRA update was computed on, W + (α/r)·B·A, as a ModelRef.

    At the seeded init B = 0 and that is ``ref`` itself. In a later federated round (``meta["adapter_weights"]``)
    the global B ≠ 0 changes every layer's attention, so the inputs of layer 1 onwards differ from the base model's:
    a span attack must compute its candidates on this model. It is merged once and saved beside the adapter
    file (a folder named by the file's content hash), like the auditor's per-round global models, or in leaklab's
    cache where that folder is read-only.
    """
    from leaklab.models.registry import _has_checkpoint, _save_atomically

    folder = _merged_folder(meta)
    if folder is None:
        return ref
    if not _has_checkpoint(folder):  # a folder whose weights were pruned is written again
        merged = copy.deepcopy(lora_model(ref, meta)).merge_and_unload()
        tokenizer = load_model(ref).tokenizer

        def write(tmp: Path) -> None:
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

        _save_atomically(folder, write)
    return ModelRef(str(folder), ref.task, ref.num_labels, ref.init_seed)


def _merged_folder(meta: dict[str, Any]) -> Path | None:
    """Beside the adapter file, or in leaklab's cache where that folder is read-only."""
    path = meta.get("adapter_weights")
    if not path:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    folder = Path(path).resolve().parent
    if os.access(folder, os.W_OK):
        return folder / f"merged-{digest}"
    return cache_dir() / "models" / f"lora-merged-{digest}"


def release(ref: ModelRef, meta: dict[str, Any]) -> None:
    """Forget the adapted and merged models built for a later federated round's LoRA update (its attacks done);
    the seeded init (no adapter file) is the federation's shared model and stays."""
    from leaklab.models.registry import unload

    path = meta.get("adapter_weights")
    if not path:
        return
    _LORA.pop((ref, json.dumps(meta, sort_keys=True)), None)
    if Path(path).exists():
        unload(ModelRef(str(_merged_folder(meta)), ref.task, ref.num_labels, ref.init_seed))


def _load_adapter(model: nn.Module, path: str) -> None:
    """Copy the adapter tensors saved at ``path`` (safetensors, by parameter name) into ``model``."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(path).items():
            if name not in params:
                raise LeaklabError(f"adapter file '{path}' holds '{name}', which the adapted model lacks")
            params[name].copy_(tensor)


def lora_update(
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None = None,
    flags: ThreatFlags | None = None,
    seed: int = 0,
    spec: LoraSpec | None = None,
    minibatch: int | None = None,
    hooks: Sequence[ClientHook] = (),
    adapter: str | None = None,
) -> tuple[Observation, Secret]:
    """Adapter gradients (``flags.learning_rate`` None: FedSGD-style) or adapter deltas Δ = θ_0 − θ_k after
    ``flags.local_steps`` SGD passes (FedAvg-style); every other weight stays frozen and unshared. ``adapter``:
    a safetensors file of global adapter weights to start from (a later federated round) instead of the seeded
    init."""
    flags = flags or ThreatFlags()
    spec = spec or LoraSpec()
    loaded = load_model(model)
    meta = spec.meta(loaded) | ({"adapter_weights": adapter} if adapter else {})
    adapted = lora_model(model, meta)
    batch, ids, labs = text_batch(loaded, texts, labels)
    grads, info = client_step(adapted, TextObjective(batch, model.task), hooks, flags, seed, minibatch)
    return package("lora", model, grads, flags, texts, ids, labs, {"lora": meta, **info})
