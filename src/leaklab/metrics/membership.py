"""Membership metrics: AUC and TPR at a fixed FPR with bootstrap intervals, the ROC curve, a distribution-shift
check between members and non-members, and the secret sharer's canary exposure.

Scores are oriented so that a higher score means "more likely a member" (label 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import roc_auc, tpr_at_fpr

FPRS = (0.01, 0.001)


def _check(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if s.shape != y.shape:
        raise LeaklabError(f"{len(s)} scores for {len(y)} labels")
    if not np.isfinite(s).all():
        raise LeaklabError(f"{int((~np.isfinite(s)).sum())} membership score(s) are NaN/inf")
    return s, y


def roc_points(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of every threshold."""
    from sklearn.metrics import roc_curve

    s, y = _check(scores, labels)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(
    scores: Sequence[float], labels: Sequence[int], fpr: float | None, rounds: int = 1000, seed: int = 0
) -> Interval:
    """AUC (``fpr`` None) or TPR@``fpr`` with a 95 % percentile interval over ``rounds`` resamples drawn with
    replacement within members and within non-members (so each resample keeps both classes)."""
    s, y = _check(scores, labels)
    metric = roc_auc if fpr is None else (lambda a, b: tpr_at_fpr(a, b, fpr))
    value = metric(s, y)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    draws = []
    for _ in range(rounds):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        draws.append(metric(s[idx], y[idx]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(float(value), float(low), float(high))


def membership_report(
    scores: Sequence[float], labels: Sequence[int], rounds: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """AUC and TPR at 1 % and 0.1 % FPR, each with its bootstrap interval. With fewer than 1/fpr non-members
    the lowest reachable FPR is 1/n: TPR@fpr is then the TPR at zero false positives."""
    out = {"auc": bootstrap(scores, labels, None, rounds, seed).to_dict()}
    for f in FPRS:
        out[f"tpr@{f:g}"] = bootstrap(scores, labels, f, rounds, seed).to_dict()
    return out


def threshold_at_fpr(non_member_scores: Sequence[float], fpr: float) -> float:
    """The smallest threshold t with share(non-member score > t) <= ``fpr``: a text is called a member when its
    score exceeds t."""
    s = np.sort(np.asarray(non_member_scores, dtype=np.float64))
    if len(s) == 0:
        raise LeaklabError("calibration needs at least one known non-member")
    if not 0 < fpr < 1:
        raise LeaklabError(f"fpr must be in (0, 1), got {fpr}")
    allowed = math.floor(fpr * len(s))  # non-members that may lie above the threshold
    return float(s[len(s) - 1 - allowed])


def length_shift(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sample Kolmogorov–Smirnov test between two samples (e.g. member and non-member token lengths)."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return {"ks": float(res.statistic), "p": float(res.pvalue)}


def exposure_exact(secret_loss: float, other_losses: Sequence[float]) -> float:
    """Exposure (Carlini et al. 2019) over a fully enumerated space R: log2|R| − log2 rank(s), rank 1 = the
    lowest loss; ``other_losses`` are the losses of every other candidate of the format. Ties count against the
    secret (rank = 1 + #{r : loss(r) <= loss(s)})."""
    other = np.asarray(other_losses, dtype=np.float64)
    size = len(other) + 1
    rank = 1 + int(np.sum(other <= secret_loss))
    return math.log2(size) - math.log2(rank)


def exposure_sampled(secret_loss: float, sampled_losses: Sequence[float], space_size: float) -> tuple[float, bool]:
    """Exposure over a space too large to enumerate: rank(s) estimated as 1 + |R|·share of uniformly sampled
    candidates with loss <= loss(s). Returns (exposure, at_bound); at_bound means no sampled candidate beat
    the secret, so the value is the ceiling log2|R| and only exposure >= log2(samples) is supported."""
    other = np.asarray(sampled_losses, dtype=np.float64)
    if len(other) == 0:
        raise LeaklabError("sampled exposure needs at least one sampled candidate")
    share = float(np.mean(other <= secret_loss))
    rank = 1 + space_size * share
    return math.log2(space_size) - math.log2(rank), share == 0.0


def exposure_fitted(secret_loss: float, sampled_losses: Sequence[float], space_size: float) -> float:
    """Exposure extrapolated past the sampling bound (Carlini et al. 2019, §4.3): the sampled candidates'
    losses fitted by a normal distribution, rank(s) ≈ 1 + |R|·P(loss <= loss(s)), so exposure
    = log2|R| − log2(1 + |R|·Φ((loss(s) − μ) / σ)), at most log2|R|."""
    from scipy.stats import norm

    other = np.asarray(sampled_losses, dtype=np.float64)
    if len(other) < 2 or not other.std() > 0:
        raise LeaklabError("fitted exposure needs at least two distinct sampled candidates")
    log_share = float(norm.logcdf(secret_loss, loc=other.mean(), scale=other.std(ddof=1)))
    log_rank = float(np.logaddexp(0.0, math.log(space_size) + log_share))  # log(1 + |R|·share), no underflow
    return math.log2(space_size) - log_rank / math.log(2)
