"""Token-set leak: the embedding gradient's non-zero rows are the tokens the batch contained.

For an untied input embedding E, ∂L/∂E[v] ≠ 0 only if token v occurs in the batch (as input, or as a
next-token target when the output head is tied to E). This is the cheapest leak; it recovers the bag of
tokens, not their order, and returns it as one pseudo-text per batch.
"""

from __future__ import annotations

import torch

from leaklab.attacks.base import Recovery, register_gradient_attack
from leaklab.errors import LeaklabError
from leaklab.models.registry import load_model
from leaklab.threat.observation import Observation


def embedding_gradient(obs: Observation) -> torch.Tensor:
    """The token-embedding gradient (vocab x d) of the update, or a clear error when it is not shared."""
    loaded = load_model(obs.model)
    name = next((n for n, p in loaded.model.named_parameters() if p is loaded.adapter.embeddings.weight), None)
    if name is None or name not in obs.gradients:
        raise LeaklabError("the update has no token-embedding gradient (frozen embeddings?): no token set leaks")
    return obs.gradients[name]


def leaked_token_ids(obs: Observation, tol: float = 0.0) -> list[int]:
    """Ids v whose embedding-gradient row has norm > tol·max row norm."""
    norms = embedding_gradient(obs).double().norm(dim=1)
    if float(norms.max()) == 0.0:
        return []
    return torch.nonzero(norms > tol * norms.max()).flatten().tolist()


@register_gradient_attack("tokenset")
class TokenSetAttack:
    name = "tokenset"

    def __init__(self, tol: float = 0.0) -> None:
        self.tol = tol

    def run(self, obs: Observation) -> Recovery:
        ids = leaked_token_ids(obs, self.tol)
        loaded = load_model(obs.model)
        return Recovery([loaded.decode(ids)], [ids], info={"n_tokens": len(ids)})
