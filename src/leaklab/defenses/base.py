"""The defense contract, the registry, and the record every defended Observation carries."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import torch

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.threat.observation import Observation

Side = Literal["server", "client", "protocol"]


class Defense(Protocol):
    """``side``: "server" transforms a computed update; "client" acts inside local training (ClientHook);
    "protocol" changes the setting (aggregation)."""

    name: ClassVar[str]
    side: ClassVar[Side]

    def apply(self, obs: Observation, seed: int = 0) -> Observation: ...

    def record(self, steps: int = 1) -> dict[str, Any]: ...


DEFENSES: dict[str, Callable[..., Defense]] = {}


def register_defense(cls):
    DEFENSES[cls.name] = cls
    return cls


def defense_names() -> list[str]:
    _load_builtin()
    return sorted(DEFENSES)


def make_defense(name: str, **params: Any) -> Defense:
    """Build a defense by name; unknown names and unknown or malformed parameters are refused."""
    _load_builtin()
    if name not in DEFENSES:
        raise UnknownNameError("defense", name, list(DEFENSES))
    cls = DEFENSES[name]
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise LeaklabError(f"defense '{name}' has no parameter(s) {unknown}; valid: {', '.join(valid) or 'none'}")
    try:
        return cls(**{k: _coerce(valid[k], v) for k, v in params.items()})
    except (TypeError, ValueError) as exc:
        raise LeaklabError(f"defense '{name}': bad parameter ({exc})") from None


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """CLI strings to the field's type (int, float, bool, str; 'none' for optional numbers)."""
    if not isinstance(value, str):
        return value
    kind = str(f.type)
    if value.lower() == "none" and "None" in kind:
        return None
    if kind.startswith("bool"):
        return value.lower() in {"1", "true", "yes"}
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value


def parse_defense(spec: str, params: list[str] | None = None) -> Defense:
    """``NAME`` plus ``k=v`` strings (e.g. ``dpsgd``, ["clip=1", "epsilon=8"])."""
    kv: dict[str, str] = {}
    for item in params or []:
        if "=" not in item:
            raise LeaklabError(f"defense parameter '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        kv[k.strip().replace("-", "_")] = v.strip()
    return make_defense(spec, **kv)


def params_of(defense: Any) -> dict[str, Any]:
    return {f.name: getattr(defense, f.name) for f in dataclasses.fields(defense)}


def base_record(defense: Any, **derived: Any) -> dict[str, Any]:
    return {"name": defense.name, "side": defense.side, "params": params_of(defense), **derived}


class Recorded:
    """Mixin: the record of a defense is its name, side and parameters, plus values it derived."""

    def record(self, steps: int = 1, **derived: Any) -> dict[str, Any]:
        return base_record(self, **derived)


def with_update(obs: Observation, gradients: dict[str, torch.Tensor], record: dict[str, Any]) -> Observation:
    """A new Observation with transformed tensors and the defense appended to ``meta["defenses"]``."""
    meta = {**obs.meta, "defenses": [*obs.meta.get("defenses", []), record]}
    return dataclasses.replace(obs, gradients=gradients, meta=meta)


def require_tensors(obs: Observation, name: str) -> None:
    if not obs.gradients or all(g.numel() == 0 for g in obs.gradients.values()):
        raise LeaklabError(f"defense '{name}' does not apply: the update shares no tensor")


def _load_builtin() -> None:
    import leaklab.defenses.dpsgd
    import leaklab.defenses.update  # noqa: F401
