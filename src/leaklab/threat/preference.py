"""Victim side, RLHF preference training: DPO on (prompt, chosen, rejected) pairs, and reward-model training.

Pairs are built from private corpus texts in one of two documented ways:

- ``shuffle``: chosen = a private text, rejected = the same tokens in a seeded random order (a "degraded"
  answer); the prompt is empty. The Secret is the B chosen texts.
- ``label``: 2B private texts are paired in draw order; chosen = the text with the higher label (for
  rotten-tomatoes, the positive review), rejected = the other. The Secret is all 2B texts.

DPO (Rafailov et al.): ℓ = −log σ(β[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]),
with π_ref the frozen initial weights; log π(y|x) sums log p(s_t | s_<t) over t ≥ 1. Reward model: a scalar
head r(·) (a sequence classifier with one output), ℓ = −log σ(r(y_c) − r(y_r)) (Bradley–Terry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.models.registry import LoadedModel, ModelRef, load_model
from leaklab.threat.fedsgd import Batch, collate
from leaklab.threat.local import (
    ClientHook,
    client_step,
    package,
    position_ids,
    sub_batch,
    token_log_probs,
)
from leaklab.threat.observation import Observation, Secret, ThreatFlags

PAIRINGS = ("shuffle", "label")


@dataclass(frozen=True)
class Pairs:
    chosen: list[list[int]]
    rejected: list[list[int]]


def texts_needed(pairing: str, n_pairs: int) -> int:
    """Private texts a batch of ``n_pairs`` pairs consumes."""
    if pairing not in PAIRINGS:
        raise UnknownNameError("pairing", pairing, list(PAIRINGS))
    return n_pairs if pairing == "shuffle" else 2 * n_pairs


def make_pairs(ids: list[list[int]], labels: list[int], pairing: str, seed: int) -> Pairs:
    """Preference pairs from tokenised private texts (see the module docstring)."""
    if pairing not in PAIRINGS:
        raise UnknownNameError("pairing", pairing, list(PAIRINGS))
    if pairing == "shuffle":
        rng = np.random.default_rng(seed)
        if any(len(t) < 2 for t in ids):
            raise LeaklabError("shuffle pairs need texts of at least 2 tokens (use --min-tokens 2)")
        return Pairs([list(t) for t in ids], [_shuffled(t, rng) for t in ids])
    if len(ids) % 2:
        raise LeaklabError(f"label pairs need an even number of texts, got {len(ids)}")
    chosen, rejected = [], []
    for a in range(0, len(ids), 2):
        first_wins = labels[a] >= labels[a + 1]
        chosen.append(list(ids[a] if first_wins else ids[a + 1]))
        rejected.append(list(ids[a + 1] if first_wins else ids[a]))
    return Pairs(chosen, rejected)


def _shuffled(t: list[int], rng: np.random.Generator) -> list[int]:
    for _ in range(10):
        perm = [t[i] for i in rng.permutation(len(t))]
        if perm != list(t):
            return perm
    return list(reversed(t))


def sequence_log_probs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log π(y) = Σ_{t≥1} log p(s_t | s_<t) per sequence, shape (B,)."""
    logp, mask = token_log_probs(model, batch)
    return (logp * mask).sum(1)


@dataclass(frozen=True)
class DpoObjective:
    """DPO loss on pairs; the reference log-probs are computed once from the frozen initial model."""

    chosen: Batch
    rejected: Batch
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    beta: float

    @property
    def n(self) -> int:
        return int(self.chosen.input_ids.shape[0])

    def sample_losses(self, model: nn.Module) -> torch.Tensor:
        margin = (sequence_log_probs(model, self.chosen) - self.ref_chosen) - (
            sequence_log_probs(model, self.rejected) - self.ref_rejected
        )
        return -torch.nn.functional.logsigmoid(self.beta * margin)

    def mean_loss(self, model: nn.Module) -> torch.Tensor:
        return self.sample_losses(model).mean()

    def subset(self, index: list[int]) -> DpoObjective:
        return DpoObjective(
            sub_batch(self.chosen, index),
            sub_batch(self.rejected, index),
            self.ref_chosen[index],
            self.ref_rejected[index],
            self.beta,
        )


def rewards(model: nn.Module, batch: Batch) -> torch.Tensor:
    """r(y): the scalar head's output at the last real token, shape (B,)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch))
    return out.logits[:, 0]


@dataclass(frozen=True)
class RewardObjective:
    """Bradley–Terry loss of a scalar reward head on pairs."""

    chosen: Batch
    rejected: Batch

    @property
    def n(self) -> int:
        return int(self.chosen.input_ids.shape[0])

    def sample_losses(self, model: nn.Module) -> torch.Tensor:
        return -torch.nn.functional.logsigmoid(rewards(model, self.chosen) - rewards(model, self.rejected))

    def mean_loss(self, model: nn.Module) -> torch.Tensor:
        return self.sample_losses(model).mean()

    def subset(self, index: list[int]) -> RewardObjective:
        return RewardObjective(sub_batch(self.chosen, index), sub_batch(self.rejected, index))


def _seq_batch(loaded: LoadedModel, ids: list[list[int]]) -> Batch:
    return collate(loaded, ids, [0] * len(ids))


def reward_ref(model: ModelRef) -> ModelRef:
    """The reward model a server distributes: the same backbone with a seeded one-output scalar head."""
    return ModelRef(model.name, "classify", 1, model.init_seed)


def preference_objective(
    setting: str,
    loaded: LoadedModel,
    ids: list[list[int]],
    labels: list[int],
    pairing: str,
    beta: float,
    seed: int,
) -> DpoObjective | RewardObjective:
    """The DPO (reference = ``loaded.model``, the initial weights) or Bradley–Terry objective on pairs."""
    pairs = make_pairs(ids, labels, pairing, seed)
    chosen, rejected = _seq_batch(loaded, pairs.chosen), _seq_batch(loaded, pairs.rejected)
    if setting == "reward":
        return RewardObjective(chosen, rejected)
    with torch.no_grad():
        return DpoObjective(
            chosen,
            rejected,
            sequence_log_probs(loaded.model, chosen),
            sequence_log_probs(loaded.model, rejected),
            beta,
        )


def _preference(
    setting: str,
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None,
    flags: ThreatFlags | None,
    seed: int,
    pairing: str,
    beta: float,
    minibatch: int | None,
    hooks: Sequence[ClientHook],
) -> tuple[Observation, Secret]:
    flags = flags or ThreatFlags()
    ref = model if setting == "dpo" else reward_ref(model)
    if setting == "dpo" and model.task != "next-token":
        raise LeaklabError("DPO trains a language model: use --task next-token")
    loaded = load_model(ref)
    ids = [loaded.encode(t) for t in texts]
    labs = list(labels) if labels is not None else [0] * len(texts)
    objective = preference_objective(setting, loaded, ids, labs, pairing, beta, seed)
    grads, info = client_step(loaded.model, objective, hooks, flags, seed, minibatch)
    meta = {
        "pairing": pairing,
        "pairs": objective.n,
        "sequences_per_pair": 2,
        **({"beta": beta, "reference": "frozen initial weights"} if setting == "dpo" else {}),
        **info,
    }
    return package(setting, ref, grads, flags, texts, ids, labs, meta, batch_size=objective.n)


def dpo_update(
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None = None,
    flags: ThreatFlags | None = None,
    seed: int = 0,
    pairing: str = "shuffle",
    beta: float = 0.1,
    minibatch: int | None = None,
    hooks: Sequence[ClientHook] = (),
) -> tuple[Observation, Secret]:
    """One client's DPO gradient (or delta, with a learning rate) on preference pairs built from ``texts``."""
    return _preference("dpo", model, texts, labels, flags, seed, pairing, beta, minibatch, hooks)


def reward_update(
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None = None,
    flags: ThreatFlags | None = None,
    seed: int = 0,
    pairing: str = "shuffle",
    minibatch: int | None = None,
    hooks: Sequence[ClientHook] = (),
) -> tuple[Observation, Secret]:
    """One client's reward-model (Bradley–Terry) gradient or delta on pairs built from ``texts``."""
    return _preference("reward", model, texts, labels, flags, seed, pairing, 0.0, minibatch, hooks)
