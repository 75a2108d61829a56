"""The Observation/Secret contract.

An :class:`Observation` is everything the threat model grants the attacker: the model reference, the shared
tensors by parameter name, and metadata, each extra piece of knowledge an explicit flag. A :class:`Secret`
(texts, token ids, labels, lengths) exists only for scoring. Attacks accept Observations and nothing else:
:func:`require_observation` is the gate every attack entry point passes through.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from leaklab.errors import LeaklabError
from leaklab.models.registry import ModelRef
from leaklab.threat.registry import THREAT_SETTINGS

SETTINGS = tuple(THREAT_SETTINGS.declared_names())  # the registered threat settings' names


@dataclass(frozen=True)
class ThreatFlags:
    """What the server knows beyond the shared tensors. Every field is recorded with each result."""

    batch_size_known: bool = True  # FedSGD servers see sample counts
    labels_known: bool = False
    lengths_known: bool = False
    train_mode: bool = False  # dropout was on when the client computed the update (known protocol fact)
    # protocol facts of multi-step and aggregated settings (the server sets them, so it knows them)
    local_steps: int = 1  # local optimiser steps behind the update (FedAvg); 1 for a gradient
    learning_rate: float | None = None  # local SGD learning rate (FedAvg); None for a gradient
    num_clients: int = 1  # clients summed into the update (secure aggregation)

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise LeaklabError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise LeaklabError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.num_clients < 1:
            raise LeaklabError(f"num_clients must be >= 1, got {self.num_clients}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThreatFlags:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise LeaklabError(f"unknown threat flags {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class Observation:
    """What the server sees. ``batch_size``, ``labels`` and ``lengths`` are None unless granted by flags."""

    model: ModelRef
    setting: str
    gradients: dict[str, torch.Tensor]
    flags: ThreatFlags = field(default_factory=ThreatFlags)
    batch_size: int | None = None
    labels: tuple[int, ...] | None = None
    lengths: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise LeaklabError(f"unknown threat setting '{self.setting}'; valid: {', '.join(SETTINGS)}")
        if (self.batch_size is not None) != self.flags.batch_size_known:
            raise LeaklabError("batch_size must be given exactly when flags.batch_size_known is set")
        if (self.labels is not None) != self.flags.labels_known:
            raise LeaklabError("labels must be given exactly when flags.labels_known is set")
        if (self.lengths is not None) != self.flags.lengths_known:
            raise LeaklabError("lengths must be given exactly when flags.lengths_known is set")
        for name, value in self.meta.items():
            if isinstance(value, Secret):
                raise TypeError(f"Observation.meta['{name}'] holds a Secret")

    def check_finite(self) -> None:
        """Refuse an update with a NaN/inf entry. A sum is finite only if every entry is, so one reduction
        per tensor clears it (a full element-wise test only where the sum is not finite: a bad entry or an
        overflowing sum)."""
        for name, g in self.gradients.items():
            if bool(torch.isfinite(g.sum())) or g.numel() == 0:
                continue
            if not torch.isfinite(g).all():
                bad = int((~torch.isfinite(g)).sum())
                raise LeaklabError(f"gradient '{name}' has {bad} NaN/inf entries; the update is corrupt")

    @property
    def defenses(self) -> list[dict[str, Any]]:
        """The defenses applied to this update, in order (name, params and derived values such as ε)."""
        return list(self.meta.get("defenses", []))

    def record(self) -> dict[str, Any]:
        """What a results file records about the observation (no tensors)."""
        return {
            "model": self.model.to_dict(),
            "setting": self.setting,
            "flags": self.flags.to_dict(),
            "batch_size": self.batch_size,
            "n_tensors": len(self.gradients),
            "meta": self.meta,
        }


@dataclass(frozen=True)
class Secret:
    """The private batch: for scoring only, never handed to an attack."""

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(t) for t in self.token_ids)

    def __len__(self) -> int:
        return len(self.texts)


def require_observation(obj: Any) -> Observation:
    """Gate for attack entry points: accept an Observation and nothing else (in particular no Secret)."""
    if isinstance(obj, Secret):
        raise TypeError("attacks receive an Observation, never a Secret")
    if not isinstance(obj, Observation):
        raise TypeError(f"attacks receive an Observation, got {type(obj).__name__}")
    obj.check_finite()
    return obj


def grad_norm(gradients: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in gradients.values()))
