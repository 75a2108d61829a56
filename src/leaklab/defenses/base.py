"""The defense contract and the record every defended Observation carries (no registry: see ``registry``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch

from leaklab.core import Config
from leaklab.errors import LeaklabError
from leaklab.threat.observation import Observation

Side = Literal["server", "client", "protocol"]


class Defense(Protocol):
    """``side``: "server" transforms a computed update; "client" acts inside local training (ClientHook);
    "protocol" changes the setting (aggregation)."""

    name: ClassVar[str]
    side: ClassVar[Side]

    def apply(self, obs: Observation, seed: int = 0) -> Observation: ...

    def record(self, steps: int = 1) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DefenseConfig(Config):
    """Base of every defense: the defense is the frozen config of its parameters (``option`` fields, checked in
    ``__post_init__``); its record is its name, side and parameters, plus values it derived."""

    name: ClassVar[str] = ""
    side: ClassVar[Side] = "server"

    def record(self, steps: int = 1, **derived: Any) -> dict[str, Any]:
        return {"name": self.name, "side": self.side, "params": self.to_dict(), **derived}


def with_update(obs: Observation, gradients: dict[str, torch.Tensor], record: dict[str, Any]) -> Observation:
    """A new Observation with transformed tensors and the defense appended to ``meta["defenses"]``."""
    meta = {**obs.meta, "defenses": [*obs.meta.get("defenses", []), record]}
    return dataclasses.replace(obs, gradients=gradients, meta=meta)


def require_tensors(obs: Observation, name: str) -> None:
    if not obs.gradients or all(g.numel() == 0 for g in obs.gradients.values()):
        raise LeaklabError(f"defense '{name}' does not apply: the update shares no tensor")
