"""One entry point for every threat setting: build a client's (Observation, Secret) by setting name.

Options per setting (anything else is refused with the valid names):
fedsgd: none · fedavg: minibatch · lora: r, alpha, targets, lora_seed, minibatch · dpo: pairing, beta,
minibatch · reward: pairing, minibatch · secagg: clients, inner, reduce, plus the inner setting's options.
Protocol facts (local steps, learning rate, dropout) travel in :class:`ThreatFlags`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.fedavg import fedavg_update
from leaklab.threat.fedsgd import fedsgd_update, private_sample
from leaklab.threat.local import ClientHook, TextObjective, client_step, package, text_batch
from leaklab.threat.lora import LoraSpec, lora_update
from leaklab.threat.observation import SETTINGS, Observation, Secret, ThreatFlags
from leaklab.threat.preference import dpo_update, reward_update, texts_needed
from leaklab.threat.secagg import secagg_update

OPTIONS: dict[str, tuple[str, ...]] = {
    "fedsgd": (),
    "fedavg": ("minibatch",),
    "lora": ("r", "alpha", "targets", "lora_seed", "minibatch"),
    "dpo": ("pairing", "beta", "minibatch"),
    "reward": ("pairing", "minibatch"),
    "secagg": ("clients", "inner", "reduce"),
}


def check_options(setting: str, options: dict[str, Any]) -> None:
    if setting not in SETTINGS:
        raise UnknownNameError("threat setting", setting, list(SETTINGS))
    valid = set(OPTIONS[setting])
    if setting == "secagg":
        valid |= set(OPTIONS[options.get("inner", "fedsgd")])
    unknown = sorted(set(options) - valid)
    if unknown:
        raise LeaklabError(
            f"setting '{setting}' has no option(s) {unknown}; valid: {', '.join(sorted(valid)) or 'none'}"
        )


def _hooked_fedsgd(
    model: ModelRef, texts: list[str], labels, flags: ThreatFlags, seed: int, hooks: Sequence[ClientHook]
) -> tuple[Observation, Secret]:
    """FedSGD through the hookable local trainer (same gradient as fedsgd_update when no hook acts)."""
    loaded = load_model(model)
    batch, ids, labs = text_batch(loaded, texts, labels)
    grads, meta = client_step(loaded.model, TextObjective(batch, model.task), hooks, flags, seed)
    return package("fedsgd", model, grads, flags, texts, ids, labs, {"loss": "mean", **meta})


def make_update(
    setting: str,
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None = None,
    flags: ThreatFlags | None = None,
    seed: int = 0,
    hooks: Sequence[ClientHook] = (),
    **options: Any,
) -> tuple[Observation, Secret]:
    """The update of ``setting`` on the private ``texts`` (for secagg: all clients' texts, split evenly)."""
    check_options(setting, options)
    flags = flags or ThreatFlags()
    mb = options.get("minibatch")
    if setting == "fedsgd":
        if flags.learning_rate is not None or flags.local_steps != 1:
            raise LeaklabError("FedSGD shares one gradient: local steps / learning rate belong to fedavg")
        if hooks:
            return _hooked_fedsgd(model, texts, labels, flags, seed, hooks)
        return fedsgd_update(model, texts, labels, flags, seed)
    if setting == "fedavg":
        return fedavg_update(model, texts, labels, flags, seed, mb, hooks)
    if setting == "lora":
        spec = LoraSpec(
            int(options.get("r", 8)),
            int(options.get("alpha", 16)),
            str(options.get("targets", "attention")),
            int(options.get("lora_seed", 0)),
        )
        return lora_update(model, texts, labels, flags, seed, spec, mb, hooks)
    if setting == "dpo":
        pairing, beta = str(options.get("pairing", "shuffle")), float(options.get("beta", 0.1))
        return dpo_update(model, texts, labels, flags, seed, pairing, beta, mb, hooks)
    if setting == "reward":
        return reward_update(model, texts, labels, flags, seed, str(options.get("pairing", "shuffle")), mb, hooks)
    inner = str(options.get("inner", "fedsgd"))
    inner_opts = {k: v for k, v in options.items() if k not in OPTIONS["secagg"]}

    def client(t: list[str], lab: list[int] | None, f: ThreatFlags, s: int) -> tuple[Observation, Secret]:
        return make_update(inner, model, t, lab, f, s, hooks, **inner_opts)

    clients = int(options.get("clients", 2))
    return secagg_update(client, texts, labels, flags, seed, clients, inner, str(options.get("reduce", "mean")))


def texts_per_batch(setting: str, batch_size: int, options: dict[str, Any]) -> int:
    """Private texts one update consumes: B per client (2B for label-paired preference data)."""
    if setting == "secagg":
        inner = str(options.get("inner", "fedsgd"))
        return int(options.get("clients", 2)) * texts_per_batch(inner, batch_size, options)
    if setting in ("dpo", "reward"):
        return texts_needed(str(options.get("pairing", "shuffle")), batch_size)
    return batch_size


def sample_update(
    setting: str,
    model: ModelRef,
    corpus: str,
    batch_size: int,
    seed: int,
    min_tokens: int = 1,
    max_tokens: int = 10**9,
    flags: ThreatFlags | None = None,
    hooks: Sequence[ClientHook] = (),
    **options: Any,
) -> tuple[Observation, Secret]:
    """Draw the private texts from ``corpus`` (private split, seeded; distinct across secagg clients) and
    compute the setting's update; ``batch_size`` is per client (pairs for dpo/reward)."""
    check_options(setting, options)
    inner = str(options.get("inner", "fedsgd")) if setting == "secagg" else setting
    n = texts_per_batch(setting, batch_size, options)
    sample = private_sample(model, corpus, n, seed, min_tokens, max_tokens, check_labels=inner != "reward")
    return make_update(setting, model, sample.texts, sample.labels, flags, seed, hooks, **options)
