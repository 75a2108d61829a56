"""Victim side, FedSGD: a client computes the gradient of its mean loss on one private batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leaklab.corpora import Sample, load_corpus, sample_texts
from leaklab.errors import LeaklabError
from leaklab.models.registry import LoadedModel, ModelRef, load_model
from leaklab.threat.observation import Observation, Secret, ThreatFlags

IGNORE = -100


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # next-token targets (pads = -100) or class labels


def collate(loaded: LoadedModel, token_ids: list[list[int]], labels: list[int]) -> Batch:
    """Right-padded tensors on the model's device; for next-token the targets are the inputs with pads ignored."""
    if not token_ids or any(len(t) == 0 for t in token_ids):
        raise LeaklabError("every text in a batch needs at least one token")
    width = max(len(t) for t in token_ids)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_ids):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    if loaded.ref.task == "next-token":
        target = ids.masked_fill(mask == 0, IGNORE)
    else:
        if any(not 0 <= lab < loaded.ref.num_labels for lab in labels):
            raise LeaklabError(f"labels {sorted(set(labels))} outside 0..{loaded.ref.num_labels - 1}")
        target = torch.tensor(labels, dtype=torch.long)
    device = loaded.device
    return Batch(ids.to(device), mask.to(device), target.to(device))


def batch_loss(loaded: LoadedModel, batch: Batch) -> torch.Tensor:
    """Mean loss of the batch: over all target tokens (next-token) or over samples (classify)."""
    out = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


def gradient(
    loaded: LoadedModel, batch: Batch, train_mode: bool = False, seed: int = 0, max_pass_tokens: int = 4096
) -> dict[str, torch.Tensor]:
    """∇θ of the batch's mean loss, by parameter name (float32, detached, on the CPU: the update as shared).

    Batches wider than ``max_pass_tokens`` (rows × width) are run in row chunks whose losses are weighted
    by their share of the batch's loss terms (target tokens, or samples for classify), so the accumulated
    gradient is the full batch's — only the peak memory changes."""
    model = loaded.model
    model.zero_grad(set_to_none=True)
    model.train(train_mode)
    rows = max(1, max_pass_tokens // max(batch.input_ids.shape[1], 1))
    terms = _loss_terms(loaded, batch)
    total = float(terms.sum())
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # fixes dropout masks in train mode
            for s in range(0, batch.input_ids.shape[0], rows):
                part = Batch(
                    batch.input_ids[s : s + rows], batch.attention_mask[s : s + rows], batch.labels[s : s + rows]
                )
                share = float(terms[s : s + rows].sum()) / total if total > 0 else 0.0
                if share == 0.0 and s > 0:
                    continue
                loss = batch_loss(loaded, part)
                (loss * share if rows < batch.input_ids.shape[0] else loss).backward()
    finally:
        model.eval()
    grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _loss_terms(loaded: LoadedModel, batch: Batch) -> torch.Tensor:
    """How many terms each row adds to the batch's mean loss: its shifted target tokens, or 1 (classify)."""
    if loaded.ref.task == "next-token":
        return (batch.labels[:, 1:] != IGNORE).sum(dim=1)
    return torch.ones(batch.labels.shape[0], dtype=torch.long, device=batch.labels.device)


def fedsgd_update(
    model: ModelRef,
    texts: list[str],
    labels: list[int] | None = None,
    flags: ThreatFlags | None = None,
    seed: int = 0,
) -> tuple[Observation, Secret]:
    """One client's FedSGD update on ``texts``, split into what the server sees and the private truth."""
    flags = flags or ThreatFlags()
    loaded = load_model(model)
    ids = [loaded.encode(t) for t in texts]
    labels = list(labels) if labels is not None else [0] * len(texts)
    batch = collate(loaded, ids, labels)
    grads = gradient(loaded, batch, train_mode=flags.train_mode, seed=seed)
    obs = Observation(
        model=model,
        setting="fedsgd",
        gradients=grads,
        flags=flags,
        batch_size=len(texts) if flags.batch_size_known else None,
        labels=tuple(labels) if flags.labels_known else None,
        lengths=tuple(len(t) for t in ids) if flags.lengths_known else None,
        meta={"padding": "right", "loss": "mean"},
    )
    return obs, Secret(tuple(texts), tuple(tuple(t) for t in ids), tuple(labels))


def private_sample(
    model: ModelRef, corpus: str, n: int, seed: int, min_tokens: int, max_tokens: int, check_labels: bool = True
) -> Sample:
    """``n`` seeded private-split texts of ``corpus``, length-selected under the model's tokenizer; a classify
    model must have room for every label of the corpus."""
    loaded = load_model(model)
    data = load_corpus(corpus)
    if check_labels and model.task == "classify" and len(data.label_names) > model.num_labels:
        raise LeaklabError(
            f"corpus '{corpus}' has {len(data.label_names)} labels but the model has {model.num_labels}; "
            f"pass --num-labels {len(data.label_names)}"
        )
    return sample_texts(data, loaded.tokenizer, n, seed, min_tokens, max_tokens)
