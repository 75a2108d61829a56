"""Running one membership attack: options checked, grants checked, outcome typed (scores, could not run, or no
signal), never a score made up for a failure."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leaklab.attacks.base import NoSignal, outcome_of
from leaklab.attacks.membership.access import LMAccess
from leaklab.attacks.membership.registry import MEMBERSHIP_ATTACKS


@dataclass
class MembershipOutcome:
    attack: str
    status: str
    reason: str | None
    scores: np.ndarray | None
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "recovered"


def score_texts(access: LMAccess, name: str, texts: Sequence[str], options: Any = None) -> np.ndarray:
    """Scores of ``texts`` by attack ``name`` (higher = likelier member); raises CannotRun / NoSignal."""
    entry = MEMBERSHIP_ATTACKS.get(name)
    scores = np.asarray(entry.impl(access, list(texts), entry.options(options)), dtype=np.float64)
    if len(scores) > 1 and np.ptp(scores) == 0:
        raise NoSignal(f"{name} gives every text the same score")
    return scores


def run_membership_attack(access: LMAccess, name: str, texts: Sequence[str], options: Any = None) -> MembershipOutcome:
    entry = MEMBERSHIP_ATTACKS.get(name)
    cfg = entry.options(options)
    start = time.perf_counter()
    status, reason, scores = outcome_of(name, lambda: score_texts(access, name, texts, cfg))
    return MembershipOutcome(
        name, status, reason, scores, time.perf_counter() - start, cfg.to_dict(), tuple(entry.extra["needs"])
    )
