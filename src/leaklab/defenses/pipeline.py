"""Run a threat setting with defenses: protocol ones change the setting, client ones hook into local
training, server ones transform the computed update, each recorded in order in ``meta["defenses"]``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from leaklab.defenses.base import Defense
from leaklab.defenses.dpsgd import DpSgd
from leaklab.defenses.update import Aggregate
from leaklab.errors import LeaklabError
from leaklab.models.registry import ModelRef
from leaklab.threat.observation import Observation, Secret, ThreatFlags
from leaklab.threat.settings import Setting, resolve_setting, sample_update


def apply_defenses(obs: Observation, defenses: Sequence[Defense], seed: int = 0) -> Observation:
    """Apply server-side defenses to a computed update in order (client/protocol ones are refused)."""
    for i, d in enumerate(defenses):
        obs = d.apply(obs, seed=seed + 7919 * i)
    return obs


def optimiser_steps(setting: Setting, batch_size: int, flags: ThreatFlags) -> int:
    """Local optimiser steps one client takes: 1 for a gradient, else local_steps · ⌈B / minibatch⌉ (B texts,
    or pairs for dpo/reward)."""
    if flags.learning_rate is None:
        return 1
    minibatch = getattr(setting.client.options, "minibatch", None) or batch_size
    return flags.local_steps * math.ceil(batch_size / minibatch)


def resolve(setting: Setting, defenses: Sequence[Defense]) -> tuple[Setting, list[Defense], list[Defense]]:
    """Split defenses by side; a protocol defense turns the setting into secagg over more clients."""
    client = [d for d in defenses if d.side == "client"]
    server = [d for d in defenses if d.side == "server"]
    protocol = [d for d in defenses if d.side == "protocol"]
    if sum(isinstance(d, DpSgd) for d in client) > 1:
        raise LeaklabError("dpsgd given twice: one client step has one gradient")
    if len(protocol) > 1:
        raise LeaklabError("aggregate given twice")
    if protocol:
        agg = protocol[0]
        assert isinstance(agg, Aggregate)
        if setting.inner is not None:
            raise LeaklabError(f"the setting is already {setting.name}: set its clients option instead of aggregate")
        setting = resolve_setting("secagg", {**setting.to_dict(), "inner": setting.name, "clients": agg.clients})
    return setting, client, server


def defended_update(
    setting: str,
    model: ModelRef,
    corpus: str,
    batch_size: int,
    seed: int,
    defenses: Sequence[Defense] = (),
    min_tokens: int = 1,
    max_tokens: int = 10**9,
    flags: ThreatFlags | None = None,
    **options: Any,
) -> tuple[Observation, Secret]:
    """One defended update of ``setting`` on a private batch drawn from ``corpus`` with ``seed``."""
    flags = flags or ThreatFlags()
    resolved, client, server = resolve(resolve_setting(setting, options), defenses)
    steps = optimiser_steps(resolved, batch_size, flags)
    hooks = [dataclasses.replace(d, steps=steps) if isinstance(d, DpSgd) and d.steps is None else d for d in client]
    obs, secret = sample_update(
        resolved.name, model, corpus, batch_size, seed, min_tokens, max_tokens, flags, hooks, **resolved.to_dict()
    )
    protocol = [d.record() for d in defenses if d.side == "protocol"]
    if protocol:
        obs = dataclasses.replace(obs, meta={**obs.meta, "defenses": [*protocol, *obs.meta.get("defenses", [])]})
    return apply_defenses(obs, server, seed), secret
