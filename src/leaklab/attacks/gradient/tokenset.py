"""Token-set leak: the embedding gradient's non-zero rows are the tokens the batch contained.

For an untied input embedding E, ∂L/∂E[v] ≠ 0 only if token v occurs in the batch (as input, or as a
next-token target when the output head is tied to E). This is the cheapest leak; it recovers the bag of
tokens, not their order, and returns it as one pseudo-text per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leaklab.attacks.base import CannotRun, Recovery, register_gradient_attack
from leaklab.core import Config, option
from leaklab.models.registry import load_model
from leaklab.threat.observation import SETTINGS, Observation

#: settings whose update can carry the token-embedding gradient (LoRA shares adapter tensors only)
BAG_SETTINGS = tuple(s for s in SETTINGS if s != "lora")


def embedding_gradient(obs: Observation) -> torch.Tensor:
    """The token-embedding gradient (vocab x d) of the update, or a clear error when it is not shared."""
    loaded = load_model(obs.model)
    name = next((n for n, p in loaded.model.named_parameters() if p is loaded.adapter.embeddings.weight), None)
    if name is None or name not in obs.gradients:
        raise CannotRun("the update has no token-embedding gradient (frozen embeddings?): no token set leaks")
    return obs.gradients[name]


def leaked_token_ids(obs: Observation, tol: float = 0.0) -> list[int]:
    """Ids v whose embedding-gradient row has norm > tol·max row norm."""
    norms = embedding_gradient(obs).double().norm(dim=1)
    if float(norms.max()) == 0.0:
        return []
    return torch.nonzero(norms > tol * norms.max()).flatten().tolist()


@dataclass(frozen=True)
class TokenSetOptions(Config):
    """Options of the token-set attack."""

    tol: float = option(0.0, "a row counts when its norm exceeds tol x the largest row norm")

    def __post_init__(self) -> None:
        self.require(non_negative=("tol",), below_one=("tol",))


def bag(obs: Observation, ids: list[int], info: dict) -> Recovery:
    """A bag-of-tokens recovery (scored as a set, never as a text)."""
    if not ids:
        return Recovery.failed("no_signal", "no token's embedding-gradient row stands out", info)
    return Recovery([load_model(obs.model).decode(ids)], [ids], info={"n_tokens": len(ids), **info}, kind="bag")


class BagAttack:
    """A token-set attack: ``leak(obs)`` gives the ids, ``run`` returns them as a bag (or no signal)."""

    name = ""
    options: type[Config] = Config

    def __init__(self, opts: Config | None = None) -> None:
        self.opts = opts or self.options()

    def leak(self, obs: Observation) -> list[int]:
        raise NotImplementedError

    def run(self, obs: Observation) -> Recovery:
        return bag(obs, self.leak(obs), {})


@register_gradient_attack("tokenset", TokenSetOptions, settings=BAG_SETTINGS)
class TokenSetAttack(BagAttack):
    """The bag of the batch's tokens: non-zero rows of an untied token-embedding gradient."""

    name, options = "tokenset", TokenSetOptions

    def leak(self, obs: Observation) -> list[int]:
        return leaked_token_ids(obs, self.opts.tol)
