"""Victim side, FedAvg: a client takes k local SGD steps on its private batch and shares the weight delta.

The shared tensors are Δ = θ_before − θ_after (sign chosen so that one full-batch step gives Δ = η·∇L, a
positive multiple of the FedSGD gradient). The server knows the protocol: the number of local steps, the
learning rate and the minibatch size are recorded in the flags and meta.
"""

from __future__ import annotations

from collections.abc import Sequence

from leaklab.errors import LeaklabError
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.local import ClientHook, TextObjective, client_step, package, text_batch
from leaklab.threat.observation import Observation, Secret, ThreatFlags


def fedavg_update(
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None = None,
    flags: ThreatFlags | None = None,
    seed: int = 0,
    minibatch: int | None = None,
    hooks: Sequence[ClientHook] = (),
) -> tuple[Observation, Secret]:
    """One client's FedAvg update: ``flags.local_steps`` passes of SGD at ``flags.learning_rate`` over
    ``texts`` (in minibatches of ``minibatch`` texts, default the whole batch)."""
    flags = flags or ThreatFlags(learning_rate=1e-3)
    if flags.learning_rate is None:
        raise LeaklabError("FedAvg needs a local learning rate (ThreatFlags.learning_rate / --lr)")
    loaded = load_model(model)
    batch, ids, labs = text_batch(loaded, texts, labels)
    delta, meta = client_step(loaded.model, TextObjective(batch, model.task), hooks, flags, seed, minibatch)
    meta = {"optimizer": "sgd", "minibatch": minibatch or len(texts), **meta}
    return package("fedavg", model, delta, flags, texts, ids, labs, meta)
