"""The gradient-attack contract and registry.

An attack is a class built from its typed options (a :class:`~leaklab.core.Config`) with ``run(obs)``.
:func:`run_attack` is the only entry point: it passes the argument through :func:`require_observation`, so a
Secret can never reach an attack, applies the threat setting's view of the update (:mod:`.gradient.views`), and
turns what happened into an outcome: recovered, could not run (with the reason) or no signal (with the reason).
Nothing turns a failure into a score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from leaklab.attacks.registry import GRADIENT_ATTACKS, attack_entry, register_gradient_attack
from leaklab.errors import LeaklabError
from leaklab.threat.observation import Observation, require_observation

T = TypeVar("T")
Status = Literal["recovered", "could_not_run", "no_signal"]
Kind = Literal["texts", "bag"]


@dataclass
class Recovery:
    """What an attack returns: recovered texts (with token ids when it works in token space), or, with ``kind``
    "bag", one unordered bag of the batch's tokens (``token_ids[0]``). ``status`` says whether the attack ran
    and found signal; ``reason`` says why not."""

    texts: list[str]
    token_ids: list[list[int]] | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    kind: Kind = "texts"
    status: Status = "recovered"
    reason: str | None = None

    @classmethod
    def failed(cls, status: Status, reason: str, info: dict[str, Any] | None = None) -> Recovery:
        return cls([], None, info=dict(info or {}), status=status, reason=reason)

    @property
    def ok(self) -> bool:
        return self.status == "recovered"


class CannotRun(LeaklabError):
    """Raised inside an attack when the Observation lacks what it needs (reported as 'could not run')."""


class NoSignal(LeaklabError):
    """Raised inside an attack when the update carries no information it can use (reported as 'no signal')."""


class GradientAttack(Protocol):
    name: str

    def run(self, obs: Observation) -> Recovery: ...


def make_attack(name: str, options: Any = None, /, **kw: Any) -> GradientAttack:
    """Build an attack from its name and options (a dict, ``k=v`` strings or its config; keywords also work).
    Unknown options fail listing the attack's keys."""
    entry = attack_entry(name)
    if options is not None and kw:
        raise LeaklabError("give attack options either as one dict/config or as keywords, not both")
    config = entry.options(options if options is not None else kw)
    attack = entry.impl(config)
    attack.name = entry.name
    attack.config = config
    return attack


def run_attack(attack: GradientAttack, obs: Any) -> Recovery:
    """Run ``attack`` on an Observation (anything else, a Secret above all, is refused) through the setting's
    view, and time it. An attack that cannot use this observation returns status "could_not_run" with the
    reason; one that finds no information, "no_signal"; neither ever reads as a score."""
    obs = require_observation(obs)
    name = getattr(attack, "name", type(attack).__name__)
    start = time.perf_counter()
    supported = _supported(name)
    if supported is not None and obs.setting not in supported:
        rec = Recovery.failed(
            "could_not_run",
            f"{name} does not support the '{obs.setting}' setting (supported: {', '.join(supported)})",
        )
    elif not any(bool(g.any()) for g in obs.gradients.values()):
        rec = Recovery.failed("no_signal", f"the {obs.setting} update is all zeros: nothing to reconstruct from")
    else:
        rec = _run_viewed(attack, obs, name)
    rec.seconds = time.perf_counter() - start
    return rec


def outcome_of(where: str, run: Callable[[], T]) -> tuple[str, str | None, T | None]:
    """(status, reason, result) of ``run()``: "recovered" with its result; "no_signal" on :class:`NoSignal` and
    "could_not_run" on any other :class:`LeaklabError`, each with a one-line reason prefixed by ``where``."""
    try:
        return "recovered", None, run()
    except NoSignal as exc:
        return "no_signal", " ".join(f"{where}: {exc}".split()), None
    except LeaklabError as exc:  # what the attack needs is missing (its input was checked before)
        return "could_not_run", " ".join(f"{where}: {exc}".split()), None


def _run_viewed(attack: GradientAttack, obs: Observation, name: str) -> Recovery:
    status, reason, rec = outcome_of(f"{name} on the '{obs.setting}' setting", lambda: _viewed(attack, obs))
    return rec if rec is not None else Recovery.failed(status, reason or "")


def _viewed(attack: GradientAttack, obs: Observation) -> Recovery:
    """The attack on the setting's view of ``obs``, then the setting's clean-up; no information → NoSignal.
    An attack with ``raw_update = True`` (one written for its settings' own tensors, e.g. ``utr`` on LoRA
    adapter gradients) gets ``obs`` itself."""
    from leaklab.attacks.gradient.views import after_view, setting_view

    if getattr(attack, "raw_update", False):
        rec = attack.run(obs)
        if rec.ok and not rec.texts:
            raise NoSignal("the attack ran but recovered no text")
        return rec
    view, adapted = setting_view(obs)
    if adapted.get("no_signal"):
        raise NoSignal(adapted["no_signal"])
    rec = after_view(obs, attack.run(view), adapted)
    rec.info["adaptation"] = adapted
    if rec.ok and not rec.texts:
        raise NoSignal("the attack ran but recovered no text")
    return rec


def _supported(name: str) -> tuple[str, ...] | None:
    """The settings the attack declares (None: every setting, or an attack built outside the registry)."""
    return GRADIENT_ATTACKS.get(name).settings if name in GRADIENT_ATTACKS else None


__all__ = [
    "GRADIENT_ATTACKS",
    "CannotRun",
    "GradientAttack",
    "NoSignal",
    "Recovery",
    "attack_entry",
    "make_attack",
    "outcome_of",
    "register_gradient_attack",
    "run_attack",
]
