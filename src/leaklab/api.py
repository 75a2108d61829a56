"""The functions a user scripts with (re-exported by ``import leaklab``).

Point leaklab at your own system: compute the update your clients share with plain ``transformers`` (or read it
from your federation), wrap it with :func:`observation_from_gradients` stating what the server knows, then
:func:`attack` it and :func:`score` the recovery against the private texts you hold for the audit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from leaklab.attacks.base import GRADIENT_ATTACKS, Recovery, make_attack, run_attack
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import RunRecord, attack_batch
from leaklab.experiments.runner import score as _score
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.observation import SETTINGS, Observation, Secret, ThreatFlags


def model_ref(model: str | Path | ModelRef, task: str = "next-token", num_labels: int = 2) -> ModelRef:
    """A packaged model name, a Hugging Face folder or hub name, or a :class:`ModelRef` as a ModelRef."""
    return model if isinstance(model, ModelRef) else ModelRef(str(model), task, num_labels)


def observation_from_gradients(
    model: str | Path | ModelRef,
    gradients: Mapping[str, torch.Tensor],
    *,
    setting: str = "fedsgd",
    batch_size: int | None = None,
    flags: ThreatFlags | None = None,
    task: str = "next-token",
    num_labels: int = 2,
    meta: Mapping[str, Any] | None = None,
) -> Observation:
    """An Observation from a plain ``{parameter name: gradient}`` dict of a Hugging Face model (names as in
    ``model.named_parameters()``), checked against the model: every name must be one of its parameters, with
    the same shape. ``batch_size`` given means the server knows it (``flags.batch_size_known``); for fedavg,
    pass the update Δ = θ₀ − θ_k and the protocol facts in ``flags`` (``learning_rate``, ``local_steps``)."""
    from leaklab.threat.store import check_against_model

    ref = model_ref(model, task, num_labels)
    if not gradients:
        raise LeaklabError("the gradient dict is empty: an Observation needs at least one shared tensor")
    if batch_size is not None and batch_size < 1:
        raise LeaklabError(f"batch_size must be at least 1, got {batch_size}")
    flags = flags or ThreatFlags(batch_size_known=batch_size is not None)
    if flags.batch_size_known != (batch_size is not None):
        raise LeaklabError("give batch_size exactly when flags.batch_size_known is set")
    grads = {}
    for name, g in gradients.items():
        if not isinstance(g, torch.Tensor):
            raise LeaklabError(f"gradient '{name}' is a {type(g).__name__}, expected a torch.Tensor")
        grads[name] = g.detach().to("cpu", torch.float32).contiguous()
    obs = Observation(ref, setting, grads, flags, batch_size, meta=dict(meta or {}))
    check_against_model(obs)
    obs.check_finite()
    return obs


def attack(name: str, observation: Observation, **options: Any) -> Recovery:
    """Run the registered gradient attack ``name`` on ``observation`` (the setting's view is applied). The
    result's ``status`` is "recovered", "could_not_run" or "no_signal" (with ``reason``)."""
    return run_attack(make_attack(name, options), observation)


def secret_from_texts(
    model: str | Path | ModelRef, texts: Sequence[str], labels: Sequence[int] | None = None
) -> Secret:
    """The private truth for scoring: ``texts`` tokenized as the model's tokenizer does (no special tokens)."""
    loaded = load_model(model_ref(model))
    ids = tuple(tuple(loaded.encode(t)) for t in texts)
    return Secret(tuple(texts), ids, tuple(labels) if labels is not None else (0,) * len(texts))


def score(observation: Observation, truth: Secret | Sequence[str], recovery: Recovery) -> dict[str, float]:
    """Scores of a recovery against the private truth (a Secret, or the private texts): ROUGE-1/2/L, token
    P/R/F1 and exact rate after one-to-one matching; a token bag as a set. Refuses an unrecovered outcome."""
    secret = truth if isinstance(truth, Secret) else secret_from_texts(observation.model, list(truth))
    if not recovery.ok:
        raise LeaklabError(f"nothing to score: the attack's outcome is '{recovery.status}' ({recovery.reason})")
    return _score(observation, secret, recovery)["aggregate"]


def run(name: str, observation: Observation, truth: Secret | Sequence[str] | None = None, **options: Any) -> RunRecord:
    """Attack and (with ``truth``) score in one call: the typed record the CLI and benchmarks write."""
    secret = truth if truth is None or isinstance(truth, Secret) else secret_from_texts(observation.model, truth)
    return attack_batch(make_attack(name, options), observation, secret)


def attacks() -> list[dict[str, Any]]:
    """The registered gradient attacks: name, help, supported settings and options (with defaults and help)."""
    return [e.describe() for e in GRADIENT_ATTACKS.entries()]


def settings() -> tuple[str, ...]:
    """The threat settings an Observation can have."""
    return SETTINGS
