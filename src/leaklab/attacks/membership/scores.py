"""Reference-free and reference-model membership scores, each higher for likelier members.

- LOSS (Yeom et al. 2018): −(1/n) Σ_t −log p(x_t | x_<t).
- zlib ratio (Carlini et al. 2021): −mean NLL / zlib-compressed length of the text in bytes.
- Min-K% (Shi et al. 2024): mean of the k % lowest log p(x_t | x_<t).
- Min-K%++ (Zhang et al. 2025): the same over z_t = (log p(x_t | x_<t) − μ_t) / σ_t, where μ_t and σ_t are the
  mean and standard deviation of log p(z | x_<t) for z ~ p(· | x_<t).
- reference (Carlini et al. 2021, Mireshghallah et al. 2022): NLL_base(x) − NLL_target(x), base model granted.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leaklab.attacks.membership.access import LMAccess
from leaklab.attacks.membership.registry import MEMBERSHIP_ATTACKS
from leaklab.core import Config, NoOptions, option
from leaklab.errors import LeaklabError


def zlib_bytes(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def lowest_share_mean(values: np.ndarray, k: float) -> float:
    """Mean of the max(1, ⌊k·n⌋) smallest values."""
    m = max(1, int(len(values) * k))
    return float(np.sort(values)[:m].mean())


def loss_score(logp: np.ndarray) -> float:
    return float(logp.mean())


def zlib_score(logp: np.ndarray, text: str) -> float:
    return float(logp.mean() / zlib_bytes(text))


def min_k_score(logp: np.ndarray, k: float) -> float:
    return lowest_share_mean(logp, k)


def min_k_pp_score(logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, k: float) -> float:
    z = (logp - mu) / np.maximum(sigma, 1e-12)
    return lowest_share_mean(z, k)


@dataclass(frozen=True)
class MinK(Config):
    """Options of Min-K% and Min-K%++."""

    k: float = option(0.2, "share of the lowest-scoring tokens averaged, in (0, 1]")

    def __post_init__(self) -> None:
        if not 0 < self.k <= 1:
            raise LeaklabError(f"k must be in (0, 1], got {self.k}")


@MEMBERSHIP_ATTACKS.register("loss", config=NoOptions, needs=())
def loss_attack(access: LMAccess, texts: Sequence[str], cfg: NoOptions) -> np.ndarray:
    """LOSS: lower mean token NLL under the fine-tune → member."""
    return np.array([loss_score(s.logp) for s in access.stats(access.target, texts)])


@MEMBERSHIP_ATTACKS.register("zlib", config=NoOptions, needs=())
def zlib_attack(access: LMAccess, texts: Sequence[str], cfg: NoOptions) -> np.ndarray:
    """zlib ratio: NLL relative to the text's zlib-compressed length."""
    return np.array([zlib_score(s.logp, t) for s, t in zip(access.stats(access.target, texts), texts, strict=True)])


@MEMBERSHIP_ATTACKS.register("min-k", config=MinK, needs=())
def min_k_attack(access: LMAccess, texts: Sequence[str], cfg: MinK) -> np.ndarray:
    """Min-K%: mean of the k % least likely tokens' log-probabilities."""
    return np.array([min_k_score(s.logp, cfg.k) for s in access.stats(access.target, texts)])


@MEMBERSHIP_ATTACKS.register("min-k++", config=MinK, needs=())
def min_k_pp_attack(access: LMAccess, texts: Sequence[str], cfg: MinK) -> np.ndarray:
    """Min-K%++: Min-K% over log-probabilities standardised by the model's own next-token distribution."""
    return np.array([min_k_pp_score(s.logp, s.mu, s.sigma, cfg.k) for s in access.stats(access.target, texts)])


@MEMBERSHIP_ATTACKS.register("reference", config=NoOptions, needs=("base",))
def reference_attack(access: LMAccess, texts: Sequence[str], cfg: NoOptions) -> np.ndarray:
    """Reference model: how much the fine-tune lowered the text's NLL below the base model's."""
    base = access.need_base("reference")
    target = access.stats(access.target, texts)
    ref = access.stats(base, texts)
    return np.array([loss_score(t.logp) - loss_score(r.logp) for t, r in zip(target, ref, strict=True)])
