"""The model a Flower run trains, as the shared tensors: ArrayRecords keyed by parameter name.

Full-model settings (fedsgd, fedavg) share every parameter (tied weights once); lora shares only the peft
adapter matrices of the model leaklab's LoRA victim builds (:func:`leaklab.threat.lora.lora_model`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from leaklab.models.registry import ModelRef, load_model


def lora_meta(model: str, r: int) -> dict:
    """The adapter leaklab's LoRA setting builds for rank ``r`` (α = 2r, attention projections, seed 0)."""
    from leaklab.threat.lora import LoraSpec

    return LoraSpec(r=r, alpha=2 * r).meta(load_model(ModelRef(model)))


def base_model(model: str, setting: str, lora_r: int) -> nn.Module:
    """The shared (memoised, read-only) model of a setting: the model itself, or its LoRA-adapted copy."""
    if setting != "lora":
        return load_model(ModelRef(model)).model
    from leaklab.threat.lora import lora_model

    return lora_model(ModelRef(model), lora_meta(model, lora_r))


@functools.cache
def working_model(model: str, setting: str, lora_r: int) -> nn.Module:
    """A private copy a client (or the server's evaluation) loads the global weights into."""
    return copy.deepcopy(base_model(model, setting, lora_r))


def shared_names(model: nn.Module) -> list[str]:
    """The names of the tensors a client shares, in model order: its trainable parameters."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Copy ``tensors`` (every shared parameter, by name) into ``model`` in place."""
    params = dict(model.named_parameters())
    missing = [n for n in shared_names(model) if n not in tensors]
    if missing:
        raise ValueError(f"the global weights lack {len(missing)} shared tensors (first: {missing[0]})")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(torch.as_tensor(np.asarray(value)).reshape(params[name].shape))
