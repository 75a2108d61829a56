"""One entry point for every threat setting: build a client's (Observation, Secret) by setting name.

Each setting is an entry of :data:`THREAT_SETTINGS`: its update function and a frozen config of its options
(``leaklab gradient settings`` lists them; anything else is refused with the setting's keys). secagg also
takes its inner setting's options, given flat (``clients=4, inner=lora, r=2``). Protocol facts (local steps,
learning rate, dropout) travel in :class:`ThreatFlags`. The model code is imported only when an update is
computed, so the registry is cheap to import (CLI help texts are built from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from leaklab.core import Config, NoOptions, option, parse_pairs
from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.threat.registry import THREAT_SETTINGS

if TYPE_CHECKING:
    from leaklab.models.registry import ModelRef
    from leaklab.threat.local import ClientHook
    from leaklab.threat.observation import Observation, Secret, ThreatFlags


@dataclass(frozen=True)
class FedAvgOptions(Config):
    """Options of a client that may train locally in minibatches."""

    minibatch: int | None = option(None, "texts (pairs for dpo/reward) per local SGD step; default: all")

    def __post_init__(self) -> None:
        if self.minibatch is not None and self.minibatch < 1:
            raise LeaklabError(f"minibatch must be >= 1, got {self.minibatch}")


@dataclass(frozen=True)
class LoraOptions(FedAvgOptions):
    """LoRA adapter W' = W + (α/r)·B·A on the attention projections."""

    r: int = option(8, "adapter rank r (>= 1)")
    alpha: int = option(16, "adapter scale α")
    targets: Literal["attention", "qv", "q"] = option("attention", "attention projections adapted")
    lora_seed: int = option(0, "seed of A's random initialisation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise LeaklabError(f"LoRA rank must be >= 1, got {self.r}")


@dataclass(frozen=True)
class RewardOptions(FedAvgOptions):
    """Preference pairs (chosen, rejected) drawn from the private texts."""

    pairing: Literal["shuffle", "label"] = option(
        "shuffle", "shuffle: B texts paired with a shuffled copy; label: 2B texts, higher label chosen"
    )


@dataclass(frozen=True)
class DpoOptions(RewardOptions):
    """DPO against the frozen initial weights as reference."""

    beta: float = option(0.1, "DPO β: loss −log σ(β·margin) (> 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.beta < math.inf:
            raise LeaklabError(f"DPO beta must be a finite number > 0, got {self.beta}")


@dataclass(frozen=True)
class SecAggOptions(Config):
    """Secure aggregation; the inner setting's options are given alongside (flat)."""

    clients: int = option(2, "clients aggregated (>= 1); the texts are split evenly over them")
    inner: str = option("fedsgd", "the setting each client runs (any but secagg)")
    reduce: Literal["mean", "sum"] = option("mean", "the server sees the mean or the sum of the updates")

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise LeaklabError(f"secure aggregation needs clients >= 1, got {self.clients}")
        inner = inner_settings()
        if self.inner not in inner:
            raise UnknownNameError("inner setting", self.inner, inner)


@dataclass(frozen=True)
class Setting:
    """A threat setting with its typed options; under secagg, ``inner`` is the setting each client runs."""

    name: str
    options: Config
    inner: Setting | None = None

    @property
    def client(self) -> Setting:
        """The setting one client runs."""
        return self.inner or self

    def texts_per_batch(self, batch_size: int) -> int:
        """Private texts one update consumes: B per client (2B for label-paired preference data) × clients."""
        if isinstance(self.options, SecAggOptions) and self.inner is not None:
            return self.options.clients * self.inner.texts_per_batch(batch_size)
        if isinstance(self.options, RewardOptions):
            from leaklab.threat.preference import texts_needed

            return texts_needed(self.options.pairing, batch_size)
        return batch_size

    def to_dict(self) -> dict[str, Any]:
        """The options, flat (the inner setting's beside secagg's), as ``make_update`` takes them."""
        return {**(self.inner.to_dict() if self.inner else {}), **self.options.to_dict()}


@dataclass(frozen=True)
class Client:
    """What one update is computed on: the model, the private batch, the protocol flags, the seed and the
    client-side defense hooks."""

    model: ModelRef
    texts: list[str]
    labels: list[int] | None
    flags: ThreatFlags
    seed: int = 0
    hooks: Sequence[ClientHook] = ()


UpdateFn = Callable[[Setting, Client], "tuple[Observation, Secret]"]


def inner_settings() -> list[str]:
    """The settings a secagg client may run."""
    return [n for n in THREAT_SETTINGS.names() if not issubclass(THREAT_SETTINGS.get(n).config, SecAggOptions)]


def resolve_setting(name: str, options: Mapping[str, Any] | Sequence[str] | None = None) -> Setting:
    """``name`` with ``options`` (a dict of typed values or strings, or ``k=v`` strings) checked and typed by the
    setting's config; an unknown option is refused with the setting's keys."""
    entry = THREAT_SETTINGS.get(name)
    values = parse_pairs(options, "setting option") if isinstance(options, list | tuple) else dict(options or {})
    if not issubclass(entry.config, SecAggOptions):
        return Setting(name, entry.options(values))
    own_keys = entry.config.keys()
    own = entry.options({k: v for k, v in values.items() if k in own_keys})
    inner = THREAT_SETTINGS.get(own.inner)
    rest = {k: v for k, v in values.items() if k not in own_keys}
    unknown = sorted(set(rest) - set(inner.config.keys()))
    if unknown:
        valid = [*own_keys, *inner.config.keys()]
        raise LeaklabError(
            f"threat setting '{name}' (inner {own.inner}) has no option {', '.join(repr(k) for k in unknown)}; "
            f"valid: {', '.join(valid)}"
        )
    return Setting(name, own, Setting(inner.name, inner.options(rest)))


@THREAT_SETTINGS.register("fedsgd", config=NoOptions)
def _fedsgd(s: Setting, c: Client) -> tuple[Observation, Secret]:
    """FedSGD: one gradient of the mean loss over the client's batch."""
    from leaklab.models.registry import load_model
    from leaklab.threat.fedsgd import fedsgd_update
    from leaklab.threat.local import TextObjective, client_step, package, text_batch

    if c.flags.learning_rate is not None or c.flags.local_steps != 1:
        raise LeaklabError("FedSGD shares one gradient: local steps / learning rate belong to fedavg")
    if not c.hooks:
        return fedsgd_update(c.model, c.texts, c.labels, c.flags, c.seed)
    # through the hookable local trainer (the same gradient as fedsgd_update when no hook acts)
    loaded = load_model(c.model)
    batch, ids, labs = text_batch(loaded, c.texts, c.labels)
    grads, meta = client_step(loaded.model, TextObjective(batch, c.model.task), c.hooks, c.flags, c.seed)
    return package("fedsgd", c.model, grads, c.flags, c.texts, ids, labs, {"loss": "mean", **meta})


@THREAT_SETTINGS.register("fedavg", config=FedAvgOptions)
def _fedavg(s: Setting, c: Client) -> tuple[Observation, Secret]:
    """FedAvg: the weight delta after local SGD steps (needs a learning rate)."""
    from leaklab.threat.fedavg import fedavg_update

    return fedavg_update(c.model, c.texts, c.labels, c.flags, c.seed, s.options.minibatch, c.hooks)


@THREAT_SETTINGS.register("lora", config=LoraOptions)
def _lora(s: Setting, c: Client) -> tuple[Observation, Secret]:
    """LoRA: only the adapter matrices' gradients (or deltas, with a learning rate) are shared."""
    from leaklab.threat.lora import LoraSpec, lora_update

    o = s.options
    spec = LoraSpec(o.r, o.alpha, o.targets, o.lora_seed)
    return lora_update(c.model, c.texts, c.labels, c.flags, c.seed, spec, o.minibatch, c.hooks)


@THREAT_SETTINGS.register("dpo", config=DpoOptions)
def _dpo(s: Setting, c: Client) -> tuple[Observation, Secret]:
    """DPO: the gradient (or delta) of the DPO loss on preference pairs of the private texts."""
    from leaklab.threat.preference import dpo_update

    o = s.options
    return dpo_update(c.model, c.texts, c.labels, c.flags, c.seed, o.pairing, o.beta, o.minibatch, c.hooks)


@THREAT_SETTINGS.register("reward", config=RewardOptions)
def _reward(s: Setting, c: Client) -> tuple[Observation, Secret]:
    """Reward model: the gradient (or delta) of the Bradley–Terry loss on preference pairs."""
    from leaklab.threat.preference import reward_update

    o = s.options
    return reward_update(c.model, c.texts, c.labels, c.flags, c.seed, o.pairing, o.minibatch, c.hooks)


@THREAT_SETTINGS.register("secagg", config=SecAggOptions)
def _secagg(s: Setting, c: Client) -> tuple[Observation, Secret]:
    """Secure aggregation: the server sees only the mean (or sum) of the clients' inner-setting updates."""
    from leaklab.threat.secagg import secagg_update

    def one(t: list[str], lab: list[int] | None, f: ThreatFlags, sd: int) -> tuple[Observation, Secret]:
        return run_setting(s.client, replace(c, texts=t, labels=lab, flags=f, seed=sd))

    o = s.options
    return secagg_update(one, c.texts, c.labels, c.flags, c.seed, o.clients, o.inner, o.reduce)


def run_setting(s: Setting, client: Client) -> tuple[Observation, Secret]:
    """The update of the resolved setting ``s`` on the client's private batch."""
    return THREAT_SETTINGS.get(s.name).impl(s, client)


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
    from leaklab.threat.observation import ThreatFlags

    s = resolve_setting(setting, options)
    return run_setting(s, Client(model, texts, labels, flags or ThreatFlags(), seed, hooks))


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
    from leaklab.threat.fedsgd import private_sample
    from leaklab.threat.observation import ThreatFlags

    s = resolve_setting(setting, options)
    n = s.texts_per_batch(batch_size)
    sample = private_sample(model, corpus, n, seed, min_tokens, max_tokens, check_labels=s.client.name != "reward")
    return run_setting(s, Client(model, sample.texts, sample.labels, flags or ThreatFlags(), seed, hooks))


def client_update(*args: Any, **kwargs: Any) -> tuple[Observation, Secret]:
    """A FedSGD update of a seeded private batch: :func:`sample_update` with setting "fedsgd" (model, corpus,
    batch_size, seed, min_tokens, max_tokens, flags)."""
    return sample_update("fedsgd", *args, **kwargs)
