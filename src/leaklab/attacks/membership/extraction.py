"""Training-data extraction of canaries: exposure (Carlini et al. 2019, "The Secret Sharer") and prompting with
the canary's prefix.

Exposure ranks the inserted secret's log-perplexity among all secrets of its format: exactly when the format's
space is small enough to enumerate, otherwise against uniformly sampled secrets (one shared sample per model).
Extraction decodes a continuation of the prefix (greedy, and beam search) and counts a canary as recovered when
the continuation starts with its secret, exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from leaklab.metrics.membership import exposure_exact, exposure_fitted, exposure_sampled
from leaklab.models.causal import CausalLM, encode_texts, model_device, sequence_nll
from leaklab.threat.finetune import Canary, format_digits, random_secrets


def all_secrets(digits: int) -> list[str]:
    return [format_digits("".join(d)) for d in itertools.product("0123456789", repeat=digits)]


def canary_exposure(
    lm: CausalLM,
    canaries: Sequence[Canary],
    digits: int,
    samples: int = 1000,
    exact_limit: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Exposure of each canary: exact over the whole space when 10^digits <= ``exact_limit``, else estimated
    against ``samples`` uniformly drawn secrets (``at_bound``: no sampled secret beat the canary)."""
    if not canaries:
        return []
    space = 10**digits
    exact = space <= exact_limit
    prefixes = sorted({c.prefix for c in canaries})
    out = []
    for prefix in prefixes:
        own = [c for c in canaries if c.prefix == prefix]
        pool = all_secrets(digits) if exact else random_secrets(samples, digits, np.random.default_rng([seed, 11]))
        pool_nll = sequence_nll(lm, [f"{prefix} {s}" for s in pool])
        canary_nll = sequence_nll(lm, [c.text for c in own])
        for c, nll in zip(own, canary_nll, strict=True):
            if exact:
                others = np.array([v for s, v in zip(pool, pool_nll, strict=True) if s != c.secret])
                value, bound = exposure_exact(float(nll), others), False
            else:
                value, bound = exposure_sampled(float(nll), pool_nll, space)
            out.append(
                {
                    "secret": c.secret,
                    "repeats": c.repeats,
                    "exposure": value,
                    "at_bound": bound,
                    "exposure_fitted": None if exact else exposure_fitted(float(nll), pool_nll, space),
                    "max_exposure": float(np.log2(space)),
                    "exact": exact,
                }
            )
    return out


@torch.no_grad()
def continuation(lm: CausalLM, prefix: str, new_tokens: int, beams: int) -> str:
    """The model's continuation of ``prefix`` (greedy when ``beams`` is 1)."""
    ids = torch.tensor([encode_texts(lm, [prefix], end=False)[0]], device=model_device(lm.model))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.start_id
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        num_beams=beams,
        pad_token_id=pad,
        eos_token_id=None,
    )
    return lm.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def reproduces(text: str, secret: str) -> bool:
    """The continuation starts with exactly ``secret`` (not followed by a further digit)."""
    cont = text.strip()
    return cont.startswith(secret) and not cont[len(secret) : len(secret) + 1].isdigit()


def extract_canaries(lm: CausalLM, canaries: Sequence[Canary], beams: Sequence[int] = (1, 5)) -> list[dict[str, Any]]:
    """For each canary and beam width: the continuation of its prefix and whether it reproduces the secret."""
    out = []
    for c in canaries:
        need = len(lm.tokenizer(" " + c.secret, add_special_tokens=False)["input_ids"]) + 1
        row: dict[str, Any] = {"secret": c.secret, "repeats": c.repeats}
        for b in beams:
            text = continuation(lm, c.prefix, need, b)
            row[f"beam{b}"] = text
            row[f"recovered_beam{b}"] = reproduces(text, c.secret)
        out.append(row)
    return out
