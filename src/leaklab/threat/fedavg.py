"""Victim side, FedAvg: a client takes k local SGD steps on its private batch and shares the weight delta.

The shared tensors are Δ = θ_before − θ_after (sign chosen so that one full-batch step gives Δ = η·∇L, a
positive multiple of the FedSGD gradient). The server knows the protocol: the number of local steps, the
learning rate and the minibatch size are recorded in the flags and meta.
"""

from __future__ import annotations

from collections.abc import Sequence

from leaklab.errors import LeaklabError
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.local import ClientHook, TextObjective, local_update, package, text_batch
from leaklab.threat.observation import Observation, Secret, ThreatFlags

DELTA = "delta = theta_before - theta_after (one full-batch step: lr * gradient)"


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
    objective = TextObjective(batch, model.task)
    delta, records, steps = local_update(
        loaded.model,
        objective,
        hooks,
        flags.train_mode,
        seed,
        flags.local_steps,
        flags.learning_rate,
        minibatch,
    )
    meta = {
        "update": DELTA,
        "optimizer": "sgd",
        "minibatch": minibatch or len(texts),
        "optimizer_steps": steps,
        **({"defenses": records} if records else {}),
    }
    return package("fedavg", model, delta, flags, texts, ids, labs, meta)
