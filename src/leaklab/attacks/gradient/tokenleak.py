"""Token-set leak for tied embeddings: rows of the embedding gradient the softmax term cannot explain.

With the LM head tied to the input embedding E,
∂L/∂E[v] = Σ_t (p_t(v) − 1[y_t = v]) h_t + Σ_{t: x_t = v} ∂L/∂e_t.
The softmax/target part of every row lies in S = span{h_t} (n dims); the input path adds a component
outside S only for tokens that occurred as inputs. So every vocabulary row is non-zero (the plain non-zero
test of :mod:`tokenset` returns the whole vocabulary), but estimating S from the bulk of rows (all but the
``exclude`` largest) and keeping the rows with a large residual outside S recovers the input tokens.
Tokens that occur only as the last token of a text (targets, never inputs) stay inside S and are missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leaklab.attacks.base import register_gradient_attack
from leaklab.attacks.gradient.subspace import numerical_rank, single_thread
from leaklab.attacks.gradient.tokenset import BAG_SETTINGS, BagAttack, embedding_gradient
from leaklab.core import Config, option
from leaklab.threat.observation import Observation


def residual_scores(grad: torch.Tensor, exclude: int = 2048) -> torch.Tensor:
    """‖(I − P_S) g_v‖ per row, S the numerical row space of the rows outside the ``exclude`` largest."""
    g = grad.double()
    norms = g.norm(dim=1)
    bulk = g[torch.argsort(norms)[: max(1, g.shape[0] - exclude)]]
    with single_thread():
        evals, evecs = torch.linalg.eigh(bulk.T @ bulk)
    sv = evals.clamp_min(0).sqrt().flip(0)
    basis = evecs.flip(1)[:, : numerical_rank(sv, noise_floor=1e-4)]
    return (g - (g @ basis) @ basis.T).norm(dim=1)


def leaked_tokens(obs: Observation, rel: float = 0.01, exclude: int = 2048) -> list[int]:
    """Ids whose residual outside the softmax span exceeds ``rel`` × the largest residual."""
    res = residual_scores(embedding_gradient(obs), exclude)
    return torch.nonzero(res > rel * res.max()).flatten().tolist()


@dataclass(frozen=True)
class ResidualOptions(Config):
    """Options of the tied-embedding token-set attack."""

    rel: float = option(0.01, "keep rows whose residual exceeds rel x the largest residual")
    exclude: int = option(2048, "largest rows left out when estimating the softmax span")

    def __post_init__(self) -> None:
        self.require(non_negative=("rel", "exclude"), below_one=("rel",))


@register_gradient_attack("tokenset-residual", ResidualOptions, settings=BAG_SETTINGS)
class ResidualTokenSet(BagAttack):
    """Bag of tokens from a tied embedding gradient (input path outside the softmax span)."""

    name, options = "tokenset-residual", ResidualOptions

    def leak(self, obs: Observation) -> list[int]:
        return leaked_tokens(obs, self.opts.rel, self.opts.exclude)
