"""Local training shared by every threat setting: objectives, the gradient of one step, k SGD steps.

A setting is (objective, trainable parameters, what is shared). The objective knows its mean loss (what an
ordinary client differentiates) and its per-sample losses (what DP-SGD differentiates per example).
Client-side defenses hook in here through :class:`ClientHook` (freeze parameters, replace the gradient of
a step), so no setting is forked to defend it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from leaklab.errors import LeaklabError
from leaklab.models.registry import LoadedModel, ModelRef
from leaklab.threat.fedsgd import IGNORE, Batch, collate
from leaklab.threat.observation import Observation, Secret, ThreatFlags

Grads = dict[str, torch.Tensor]
DELTA = "delta = theta_before - theta_after (one full-batch step: lr * gradient)"


class Objective(Protocol):
    """A local training loss over ``n`` samples (texts, or preference pairs)."""

    n: int

    def mean_loss(self, model: nn.Module) -> torch.Tensor: ...

    def sample_losses(self, model: nn.Module) -> torch.Tensor: ...

    def subset(self, index: list[int]) -> Objective: ...


class ClientHook(Protocol):
    """A client-side defense: may freeze parameters before training and may replace a step's gradient."""

    name: str

    def prepare(self, model: nn.Module) -> None: ...

    def gradient(self, model: nn.Module, objective: Objective, seed: int) -> Grads | None: ...

    def record(self, steps: int) -> dict[str, Any]: ...


def position_ids(batch: Batch) -> torch.Tensor:
    """Explicit (B, T) positions so every embedding sees the batch dimension (Opacus needs it for wpe)."""
    b, t = batch.input_ids.shape
    return torch.arange(t, device=batch.input_ids.device).unsqueeze(0).expand(b, t)


def token_log_probs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(s_t | s_<t) for t >= 1, shape (B, T-1), and the mask of real (non-pad) targets."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch)
    ).logits[:, :-1]
    targets = batch.input_ids[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, batch.attention_mask[:, 1:].bool()


@dataclass(frozen=True)
class TextObjective:
    """Next-token or classification loss on a batch of texts; mean loss = HF's (mean over all targets)."""

    batch: Batch
    task: str

    @property
    def n(self) -> int:
        return int(self.batch.input_ids.shape[0])

    def mean_loss(self, model: nn.Module) -> torch.Tensor:
        b = self.batch
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss

    def sample_losses(self, model: nn.Module) -> torch.Tensor:
        """ℓ_i: mean token cross-entropy of text i (next-token) or its class cross-entropy (classify)."""
        b = self.batch
        if self.task == "classify":
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=position_ids(b)).logits
            return torch.nn.functional.cross_entropy(logits, b.labels, reduction="none")
        logp, mask = token_log_probs(model, b)
        mask = mask & (b.labels[:, 1:] != IGNORE)
        return -(logp * mask).sum(1) / mask.sum(1).clamp(min=1)

    def subset(self, index: list[int]) -> TextObjective:
        return TextObjective(sub_batch(self.batch, index), self.task)


def sub_batch(b: Batch, index: list[int]) -> Batch:
    """Rows ``index`` of a right-padded batch, trimmed to their longest text."""
    width = int(b.attention_mask[index].sum(1).max())
    labels = b.labels[index, :width] if b.labels.dim() == 2 else b.labels[index]
    return Batch(b.input_ids[index, :width], b.attention_mask[index, :width], labels)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def mean_gradient(model: nn.Module, objective: Objective) -> Grads:
    """∇θ of the objective's mean loss over the trainable parameters."""
    params = trainable(model)
    grads = torch.autograd.grad(objective.mean_loss(model), list(params.values()), allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(p)).detach()
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


@dataclass
class LocalTrainer:
    """A private copy of the shared model, client hooks applied (the memoised model is never touched)."""

    model: nn.Module
    hooks: Sequence[ClientHook] = ()
    train_mode: bool = False

    @classmethod
    def from_model(cls, base: nn.Module, hooks: Sequence[ClientHook] = (), train_mode: bool = False):
        model = copy.deepcopy(base)
        for hook in hooks:
            hook.prepare(model)
        if not trainable(model):
            raise LeaklabError("no parameter is left trainable: nothing would be shared")
        return cls(model, hooks, train_mode)

    def gradient(self, objective: Objective, seed: int) -> Grads:
        """One step's gradient: a hook's (e.g. DP-SGD's) if one supplies it, else the mean-loss gradient."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # fixes dropout masks in train mode
            self.model.train(self.train_mode)
            try:
                for hook in self.hooks:
                    grads = hook.gradient(self.model, objective, seed)
                    if grads is not None:
                        return grads
                return mean_gradient(self.model, objective)
            finally:
                self.model.eval()

    def sgd_delta(self, objective: Objective, steps: int, lr: float, minibatch: int | None, seed: int) -> Grads:
        """Δ = θ_0 − θ_k after k plain SGD steps θ ← θ − η·g (each step one pass over the minibatches)."""
        params = trainable(self.model)
        start = {n: p.detach().clone() for n, p in params.items()}
        self.sgd_steps(objective, steps, lr, minibatch, seed)
        return {n: (start[n] - p.detach()).clone() for n, p in params.items()}

    def sgd_steps(self, objective: Objective, steps: int, lr: float, minibatch: int | None, seed: int) -> None:
        """``steps`` plain SGD steps θ ← θ − η·g on the trainer's model, in place (each step one pass over the
        minibatches)."""
        params = trainable(self.model)
        size = minibatch or objective.n
        chunks = [list(range(i, min(i + size, objective.n))) for i in range(0, objective.n, size)]
        k = 0
        for _ in range(steps):
            for chunk in chunks:
                sub = objective if len(chunk) == objective.n else objective.subset(chunk)
                grads = self.gradient(sub, seed + k)
                with torch.no_grad():
                    for n, p in params.items():
                        p.sub_(lr * grads[n])
                k += 1

    def records(self, steps: int) -> list[dict[str, Any]]:
        return [hook.record(steps) for hook in self.hooks]


def local_update(
    base: nn.Module,
    objective: Objective,
    hooks: Sequence[ClientHook],
    train_mode: bool,
    seed: int,
    steps: int = 1,
    lr: float | None = None,
    minibatch: int | None = None,
) -> tuple[Grads, list[dict[str, Any]], int]:
    """The shared tensors: the gradient (``lr`` None) or the delta of ``steps`` SGD steps; plus hook records
    and the number of optimiser steps taken."""
    trainer = LocalTrainer.from_model(base, hooks, train_mode)
    if lr is None:
        if steps != 1 or minibatch:
            raise LeaklabError("a gradient update is one step on the whole batch: give a learning rate for more")
        return trainer.gradient(objective, seed), trainer.records(1), 1
    if minibatch is not None and minibatch < 1:
        raise LeaklabError(f"minibatch size must be >= 1, got {minibatch}")
    delta = trainer.sgd_delta(objective, steps, lr, minibatch, seed)
    n_steps = steps * -(-objective.n // (minibatch or objective.n))
    return delta, trainer.records(n_steps), n_steps


def text_batch(
    loaded: LoadedModel, texts: Sequence[str], labels: Sequence[int] | None
) -> tuple[Batch, list[list[int]], list[int]]:
    """Tokenise and collate private texts exactly as FedSGD does."""
    ids = [loaded.encode(t) for t in texts]
    labs = list(labels) if labels is not None else [0] * len(texts)
    return collate(loaded, ids, labs), ids, labs


def package(
    setting: str,
    ref: ModelRef,
    grads: Grads,
    flags: ThreatFlags,
    texts: Sequence[str],
    ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    meta: dict[str, Any],
    batch_size: int | None = None,
) -> tuple[Observation, Secret]:
    """Split a client's result into what the server sees (as the flags grant, tensors on the CPU as shared)
    and the private truth."""
    obs = Observation(
        model=ref,
        setting=setting,
        gradients={n: g.detach().to("cpu") for n, g in grads.items()},
        flags=flags,
        batch_size=(batch_size if batch_size is not None else len(texts)) if flags.batch_size_known else None,
        labels=tuple(labels) if flags.labels_known else None,
        lengths=tuple(len(t) for t in ids) if flags.lengths_known else None,
        meta={"padding": "right", **meta},
    )
    return obs, Secret(tuple(texts), tuple(tuple(t) for t in ids), tuple(labels))


def client_step(
    base: nn.Module,
    objective: Objective,
    hooks: Sequence[ClientHook],
    flags: ThreatFlags,
    seed: int,
    minibatch: int | None = None,
) -> tuple[Grads, dict[str, Any]]:
    """The client's shared tensors under the protocol in ``flags`` (a gradient without a learning rate, else
    the delta of ``flags.local_steps`` SGD passes), and the meta every setting records about them."""
    grads, records, steps = local_update(
        base, objective, hooks, flags.train_mode, seed, flags.local_steps, flags.learning_rate, minibatch
    )
    meta = {
        "update": "gradient" if flags.learning_rate is None else DELTA,
        "optimizer_steps": steps,
        **({"defenses": records} if records else {}),
    }
    return grads, meta
