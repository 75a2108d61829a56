"""Seeded, reproducible sampling of texts by token length, with a fixed public/private split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from leaklab.corpora.registry import Corpus
from leaklab.errors import LeaklabError

Split = Literal["private", "public", "all"]
PRIVATE_SHARE = 0.3


def split_of(text: str) -> str:
    """'private' (victim data, scored) or 'public' (attacker's auxiliary data), fixed by a hash of the text
    so that any attack that trains on public text never trains on a text it is scored on."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "private" if bucket < PRIVATE_SHARE else "public"


@dataclass(frozen=True)
class Sample:
    texts: list[str]
    labels: list[int]
    token_ids: list[list[int]]


def token_lengths(corpus: Corpus, tokenizer) -> np.ndarray:
    enc = tokenizer(list(corpus.texts), add_special_tokens=False)["input_ids"]
    return np.array([len(e) for e in enc])


def eligible(
    corpus: Corpus, tokenizer, min_tokens: int = 1, max_tokens: int = 10**9, split: Split = "private"
) -> list[int]:
    if min_tokens < 1 or max_tokens < min_tokens:
        raise LeaklabError(f"bad length range {min_tokens}..{max_tokens}: need 1 <= min-tokens <= max-tokens")
    lengths = token_lengths(corpus, tokenizer)
    idx = [
        i
        for i, n in enumerate(lengths)
        if min_tokens <= n <= max_tokens and (split == "all" or split_of(corpus.texts[i]) == split)
    ]
    if not idx:
        in_split = [i for i, t in enumerate(corpus.texts) if split == "all" or split_of(t) == split]
        if not in_split:
            raise LeaklabError(
                f"corpus '{corpus.name}' has no text in the {split} split ({len(corpus.texts)} texts; each text goes "
                "to a split by a hash, 30 % private, 70 % public): give more texts"
            )
        span = lengths[in_split]
        raise LeaklabError(
            f"no text of corpus '{corpus.name}' ({split} split) has {min_tokens}..{max_tokens} tokens "
            f"(its texts there have {int(span.min())}..{int(span.max())})"
        )
    return idx


def sample_texts(
    corpus: Corpus,
    tokenizer,
    n: int,
    seed: int,
    min_tokens: int = 1,
    max_tokens: int = 10**9,
    split: Split = "private",
) -> Sample:
    """``n`` distinct texts drawn with ``seed`` from those with ``min_tokens..max_tokens`` tokens."""
    if n < 1:
        raise LeaklabError(f"need at least one text, asked for {n}")
    idx = eligible(corpus, tokenizer, min_tokens, max_tokens, split)
    if n > len(idx):
        raise LeaklabError(
            f"asked for {n} texts but corpus '{corpus.name}' has only {len(idx)} in the {split} split "
            f"with {min_tokens}..{max_tokens} tokens"
        )
    rng = np.random.default_rng(seed)
    chosen = [idx[i] for i in rng.choice(len(idx), size=n, replace=False)]
    texts = [corpus.texts[i] for i in chosen]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return Sample(texts, [corpus.labels[i] for i in chosen], [list(x) for x in ids])
