"""The gradient-attack contract and registry.

An attack is a class with a ``name`` and ``run(obs)``. :func:`run_attack` is the only entry point: it
passes the argument through :func:`require_observation`, so a Secret can never reach an attack.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.threat.observation import Observation, require_observation


@dataclass
class Recovery:
    """What an attack returns: recovered texts (with token ids when it works in token space)."""

    texts: list[str]
    token_ids: list[list[int]] | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class GradientAttack(Protocol):
    name: str

    def run(self, obs: Observation) -> Recovery: ...


GRADIENT_ATTACKS: dict[str, Callable[..., GradientAttack]] = {}


def register_gradient_attack(name: str) -> Callable:
    def deco(factory: Callable[..., GradientAttack]) -> Callable[..., GradientAttack]:
        GRADIENT_ATTACKS[name] = factory
        return factory

    return deco


def make_attack(name: str, **options: Any) -> GradientAttack:
    _load_builtin_attacks()
    if name not in GRADIENT_ATTACKS:
        raise UnknownNameError("attack", name, list(GRADIENT_ATTACKS))
    try:
        return GRADIENT_ATTACKS[name](**options)
    except TypeError as exc:  # an option the attack's options dataclass does not have
        raise LeaklabError(f"attack '{name}' does not accept the options {sorted(options)}: {exc}") from exc


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["beam=4", "budget_s=120"]`` → ``{"beam": 4, "budget_s": 120.0}`` (ints, floats, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LeaklabError(f"option '{item}' is not of the form key=value")
        key, raw = (x.strip() for x in item.split("=", 1))
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        out[key.replace("-", "_")] = value
    return out


def run_attack(attack: GradientAttack, obs: Any) -> Recovery:
    """Run ``attack`` on an Observation (anything else, a Secret above all, is refused) and time it."""
    obs = require_observation(obs)
    start = time.perf_counter()
    rec = attack.run(obs)
    rec.seconds = time.perf_counter() - start
    return rec


def _load_builtin_attacks() -> None:
    import importlib
    import pkgutil

    import leaklab.attacks.gradient as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
