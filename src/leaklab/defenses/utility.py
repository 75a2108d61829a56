"""Utility of a (defended) update: the victim model's validation loss after applying it, on public texts.

The update moves the shared weights as the protocol does: θ ← θ − Δ for deltas (FedAvg-style, Δ =
θ_before − θ_after), θ ← θ − η·g for gradients (η = ``server_lr``). The model is then scored on a seeded
sample of the corpus's *public* split (never the private texts): next-token loss, or loss and accuracy for
classification; DPO loss and pairwise accuracy (margin > 0) for dpo; Bradley–Terry loss and pairwise
accuracy (r_c > r_r) for reward models. Compare with and without a defense after the same local steps.

One step hides what a defense costs over training: :func:`horizon_utility` applies ``steps`` consecutive
(defended) FedSGD/FedAvg rounds, each computed at the weights the previous rounds left, on the private batches
of seeds ``seed``, ``seed + 1``, … (the same batches with and without a defense), and scores the result.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leaklab.core import Config, option
from leaklab.corpora import load_corpus, sample_texts
from leaklab.errors import LeaklabError
from leaklab.models.registry import load_model
from leaklab.threat.fedsgd import collate
from leaklab.threat.local import TextObjective
from leaklab.threat.observation import Observation
from leaklab.threat.preference import preference_objective, rewards, sequence_log_probs
from leaklab.threat.store import _shared_model


def inner_setting(obs: Observation) -> tuple[str, dict[str, Any]]:
    """The setting each client ran, and its meta (secagg wraps another setting)."""
    if obs.setting == "secagg":
        return obs.meta["inner_setting"], obs.meta["inner_meta"]
    return obs.setting, obs.meta


def is_gradient(obs: Observation) -> bool:
    setting, meta = inner_setting(obs)
    return setting == "fedsgd" or meta.get("update") == "gradient"


def updated_model(obs: Observation, server_lr: float) -> nn.Module:
    """A copy of the shared model with the update applied (θ − Δ, or θ − η·g for a gradient)."""
    model = copy.deepcopy(_shared_model(obs.model, obs.meta))
    scale = server_lr if is_gradient(obs) else 1.0
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, u in obs.gradients.items():
            if name not in params:
                raise LeaklabError(f"update tensor '{name}' is not a parameter of the model it names")
            params[name].sub_(scale * u)
    model.eval()
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module, obs: Observation, texts: list[str], labels: list[int], seed: int = 0
) -> dict[str, float | None]:
    """Validation loss (and accuracy where it exists) of ``model`` for the update's setting."""
    setting, meta = inner_setting(obs)
    loaded = load_model(obs.model)
    ids = [loaded.encode(t) for t in texts]
    if setting in ("dpo", "reward"):
        objective = preference_objective(setting, loaded, ids, labels, "shuffle", meta.get("beta", 0.1), seed)
        loss = float(objective.mean_loss(model))
        if setting == "reward":
            wins = rewards(model, objective.chosen) > rewards(model, objective.rejected)
        else:
            margin = (sequence_log_probs(model, objective.chosen) - objective.ref_chosen) - (
                sequence_log_probs(model, objective.rejected) - objective.ref_rejected
            )
            wins = margin > 0
        return {"loss": loss, "accuracy": float(wins.float().mean())}
    batch = collate(loaded, ids, labels if obs.model.task == "classify" else [0] * len(ids))
    loss = float(TextObjective(batch, obs.model.task).mean_loss(model))
    if obs.model.task != "classify":
        return {"loss": loss, "accuracy": None}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return {"loss": loss, "accuracy": float((logits.argmax(-1) == batch.labels).float().mean())}


def validation_texts(
    obs: Observation, corpus: str, n: int, seed: int, min_tokens: int, max_tokens: int
) -> tuple[list[str], list[int]]:
    """A seeded sample of the corpus's public split (held out from every private batch)."""
    loaded = load_model(obs.model)
    sample = sample_texts(load_corpus(corpus), loaded.tokenizer, n, seed, min_tokens, max_tokens, split="public")
    return sample.texts, sample.labels


def utility(
    obs: Observation,
    corpus: str,
    n: int = 16,
    seed: int = 0,
    min_tokens: int = 2,
    max_tokens: int = 32,
    server_lr: float = 1e-3,
) -> dict[str, Any]:
    """Validation loss/accuracy on ``n`` public texts after applying ``obs``'s update to the shared model."""
    texts, labels = validation_texts(obs, corpus, n, seed, min_tokens, max_tokens)
    scores = evaluate(updated_model(obs, server_lr), obs, texts, labels, seed)
    before = evaluate(_shared_model(obs.model, obs.meta), obs, texts, labels, seed)
    return {
        **scores,
        "loss_before": before["loss"],
        "eval_texts": n,
        "split": "public",
        "applied": "theta - lr*g" if is_gradient(obs) else "theta - delta",
        "server_lr": server_lr if is_gradient(obs) else None,
    }


@dataclass(frozen=True)
class HorizonOptions(Config):
    """Utility over a training horizon: validation loss after ``steps`` rounds of the (defended) update."""

    steps: int = option(20, "FedSGD/FedAvg rounds applied before the validation loss is taken (0: skip)")
    server_lr: float = option(1e-3, "step size η of θ ← θ − η·g for a gradient update")
    texts: int = option(16, "public texts scoring the validation loss")

    def __post_init__(self) -> None:
        self.require(positive=("server_lr", "texts"), non_negative=("steps",))


#: settings whose client trains the memoised shared model itself (the horizon moves that model's weights)
HORIZON_SETTINGS = ("fedsgd", "fedavg")


def horizon_utility(
    setting: str,
    model: Any,
    corpus: str,
    batch_size: int,
    seed: int,
    defenses: Sequence[Any] = (),
    opts: HorizonOptions | None = None,
    min_tokens: int = 1,
    max_tokens: int = 32,
    flags: Any = None,
    **setting_options: Any,
) -> dict[str, Any]:
    """Validation loss after ``opts.steps`` consecutive defended updates (batch seeds seed, seed + 1, …), each
    computed at the weights the earlier ones left; the shared model's weights are restored afterwards."""
    from leaklab.defenses.pipeline import defended_update

    if setting not in HORIZON_SETTINGS:
        raise LeaklabError(f"utility over a horizon runs on {' or '.join(HORIZON_SETTINGS)}, not '{setting}'")
    opts = opts or HorizonOptions()

    def update(step: int) -> Observation:
        return defended_update(
            setting, model, corpus, batch_size, seed + step, defenses, min_tokens, max_tokens, flags, **setting_options
        )[0]

    first = update(0)
    shared = _shared_model(first.model, first.meta)
    texts, labels = validation_texts(first, corpus, opts.texts, seed, 2, max_tokens)
    params = dict(shared.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items() if n in first.gradients}
    before = evaluate(shared, first, texts, labels, seed)
    scale = opts.server_lr if is_gradient(first) else 1.0
    try:
        for step in range(opts.steps):
            obs = first if step == 0 else update(step)
            with torch.no_grad():
                for name, u in obs.gradients.items():
                    params[name].sub_(scale * u.to(params[name].device, params[name].dtype))
        shared.eval()
        after = evaluate(shared, first, texts, labels, seed)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    return {
        "steps": opts.steps,
        "loss": after["loss"],
        "accuracy": after["accuracy"],
        "loss_before": before["loss"],
        "eval_texts": opts.texts,
        "split": "public",
        "server_lr": opts.server_lr if is_gradient(first) else None,
        "batch_seeds": list(range(seed, seed + opts.steps)),
    }
