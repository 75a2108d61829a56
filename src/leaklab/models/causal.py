"""Causal language models as the LM membership and extraction code sees them: a model folder (or packaged name)
loaded for next-token prediction, texts encoded as ``[BOS] + tokens`` and per-token log-probabilities.

Training (:mod:`leaklab.threat.finetune`) and scoring (:mod:`leaklab.attacks.membership`) share
:func:`encode_texts`, so a member is scored on exactly the tokens it was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leaklab.errors import LeaklabError

MAX_LEN = 128


@dataclass
class CausalLM:
    """A causal LM in eval mode with its tokenizer; ``name`` is the packaged name or the folder."""

    name: str
    model: nn.Module
    tokenizer: Any

    @property
    def start_id(self) -> int:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise LeaklabError(f"the tokenizer of '{self.name}' has neither a BOS nor an EOS token")
        return int(start)


def _check_causal_folder(folder: Path) -> None:
    """A clear error when ``folder`` is not a causal LM's Hugging Face folder."""
    from transformers import AutoConfig

    from leaklab.models.registry import _is_decoder_config

    if not folder.is_dir():
        raise LeaklabError(f"model folder '{folder}' does not exist")
    try:
        cfg = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise LeaklabError(
            f"'{folder}' is not a Hugging Face model folder ({' '.join(str(exc).split())[:120]})"
        ) from None
    if not _is_decoder_config(cfg):
        raise LeaklabError(f"'{folder}' is not a causal language model (its config is a {cfg.model_type} encoder)")


def load_causal_lm(name: str) -> CausalLM:
    """A packaged causal LM by name, or any Hugging Face causal-LM folder (a fresh copy, eval mode, no grads)."""
    import copy

    from leaklab.models.registry import PACKAGED, ModelRef, load_model

    if name not in PACKAGED:
        _check_causal_folder(Path(os.path.expanduser(name)))
    elif "next-token" not in PACKAGED[name].tasks:
        raise LeaklabError(f"'{name}' is not a causal language model (it is an encoder)")
    loaded = load_model(ModelRef(name))
    model = copy.deepcopy(loaded.model) if name in PACKAGED else loaded.model
    if name not in PACKAGED:
        from leaklab.models.device import current_device
        from leaklab.models.registry import _LOADED

        _LOADED.pop((ModelRef(name), current_device()), None)  # a user's folder may change: never a stale copy
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return CausalLM(name, model, loaded.tokenizer)


def same_tokenizer(a: CausalLM, b: CausalLM) -> bool:
    """True when both tokenizers map every token string to the same id (token-level comparisons are valid)."""
    return a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def encode_texts(lm: CausalLM, texts: Sequence[str], max_len: int = MAX_LEN, end: bool = True) -> list[list[int]]:
    """``[start] + tokens(text) + [EOS]`` for each text (no EOS with ``end`` False, for a prompt), cut at
    ``max_len`` ids. Training ends each text with EOS, so a fine-tune learns where a memorised text stops."""
    ids = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = lm.tokenizer.eos_token_id
    tail = [eos] if end and eos is not None else []
    return [[lm.start_id, *x, *tail][:max_len] for x in ids]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) right-padded; labels are -100 on the start token and on padding."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return ids, mask, labels


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def sample_losses(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token NLL over its labelled positions, shape (B,), on the model's device."""
    device = model_device(model)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    keep = (target != -100).float()
    return (nll * keep).sum(1) / keep.sum(1).clamp(min=1)


@dataclass(frozen=True)
class TokenStats:
    """Per predicted token of one text: log p(x_t | x_<t), and the mean μ_t and standard deviation σ_t of
    log p(z | x_<t) over z drawn from the model's own next-token distribution (Min-K%++'s normalisers)."""

    logp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @property
    def loss(self) -> float:
        """Mean next-token NLL."""
        return float(-self.logp.mean())


@torch.no_grad()
def token_stats(lm: CausalLM, texts: Sequence[str], batch_size: int = 32) -> list[TokenStats]:
    """One forward pass per batch gives every token-level statistic the membership scores need."""
    seqs = encode_texts(lm, texts)
    short = [i for i, s in enumerate(seqs) if len(s) < 2]
    if short:
        raise LeaklabError(f"text {short[0] + 1} has no token to score (empty after tokenisation)")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.start_id
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths together: less padding
    stats: dict[int, TokenStats] = {}
    device = model_device(lm.model)
    for b in range(0, len(order), batch_size):
        chunk = [int(i) for i in order[b : b + batch_size]]
        ids, mask, _ = (t.to(device) for t in pad_batch([seqs[i] for i in chunk], pad))
        logp_all = torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
        probs = logp_all.exp()
        mu = (probs * logp_all).sum(-1)
        sigma = ((probs * logp_all.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
        true, mu, sigma = (t.cpu() for t in (logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1), mu, sigma))
        for row, i in enumerate(chunk):
            n = len(seqs[i]) - 1
            stats[i] = TokenStats(true[row, :n].numpy(), mu[row, :n].numpy(), sigma[row, :n].numpy())
    return [stats[i] for i in range(len(seqs))]


@torch.no_grad()
def sequence_nll(lm: CausalLM, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Total next-token NLL of each text (its log-perplexity times its token count), in nats."""
    seqs = encode_texts(lm, texts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.start_id
    out = np.zeros(len(seqs))
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        ids, mask, labels = pad_batch(chunk, pad)
        mean = sample_losses(lm.model, ids, mask, labels)
        counts = (labels[:, 1:] != -100).sum(1)
        out[b : b + len(chunk)] = (mean.cpu() * counts).numpy()
    return out
