"""White-box inversion: discrete coordinate search that evaluates the real encoder in batches.

Objective: J(x) = cos(e(x), v) − λ·|x| (λ: a length penalty, since the length is unknown and a longer text
can always fit v a little better with filler).

1. start: the bag-of-words inverter's words for v (or any given text, or the empty text); its top words are
   also proposed at every position (the pool).
2. passes over positions t = 0..|x|: with g = ∂cos/∂(input embedding) of x (one backward pass), propose
   the top-K HotFlip swaps x_t → w by the first-order gain ⟨g_t, E_w − E_{x_t}⟩, the deletion of x_t, and the
   top-K insertions before t by ⟨ḡ_t, E_w⟩ (ḡ_t: mean gradient of the neighbours); all proposals are scored
   by one batched forward pass of the encoder and the best is kept if it raises J.
3. repeat passes until none raises J (or ``passes`` run out).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from leaklab.attacks.embedding.registry import (
    AttackReport,
    Scenario,
    examples,
    option,
    register_embed_attack,
    victim_targets,
)
from leaklab.encoders import Encoder, LocalEncoder, check_vectors, require_local
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import score_inversion


def vocab_from_texts(tokenizer: Any, texts: list[str], size: int = 8000, whole_words: bool = True) -> list[int]:
    """The ``size`` most frequent non-special token ids of ``texts`` (the attacker's public prior); with
    ``whole_words`` no word-piece continuations (``##x``), so every proposal is a word."""
    counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
    special = set(tokenizer.all_special_ids)
    ranked = [i for i, _ in counts.most_common() if i not in special]
    if whole_words:
        ranked = [i for i in ranked if not str(tokenizer.convert_ids_to_tokens(i)).startswith("##")]
    return ranked[:size]


class WhiteBoxInverter:
    """Batched coordinate search over token sequences through a local encoder."""

    name = "whitebox"

    def __init__(
        self,
        encoder: Encoder,
        vocab_ids: list[int] | None = None,
        candidates: int = 24,
        length_penalty: float = 0.01,
        max_len: int = 24,
        passes: int = 6,
    ) -> None:
        self.encoder: LocalEncoder = require_local(encoder, self.name)
        tok = self.encoder.tokenizer
        if vocab_ids is None:
            special = set(tok.all_special_ids)
            vocab_ids = [i for i in range(self.encoder.word_embeddings.shape[0]) if i not in special]
        if not vocab_ids:
            raise LeaklabError("white-box vocabulary is empty")
        if max_len < 1 or candidates < 1:
            raise LeaklabError(f"max_len and candidates must be >= 1, got {max_len} and {candidates}")
        self.vocab = torch.tensor(list(dict.fromkeys(vocab_ids)))
        self.candidates, self.penalty, self.max_len, self.passes = candidates, length_penalty, max_len, passes
        self.emb = self.encoder.word_embeddings.detach()
        self.sub = self.emb[self.vocab]
        self.cls_id, self.sep_id = tok.cls_token_id, tok.sep_token_id
        self.forward_passes = 0

    def cosines(self, seqs: list[list[int]], target: torch.Tensor) -> np.ndarray:
        """cos(e(x), v) of each token sequence (one batched forward pass)."""
        self.forward_passes += len(seqs)
        before = self.encoder.usage.snapshot()
        vecs = torch.from_numpy(self.encoder.embed_ids(seqs))
        self.encoder.usage.queries = before.queries  # counted once, in invert()
        return torch.nn.functional.cosine_similarity(vecs, target.expand_as(vecs)).numpy()

    def objective(self, seqs: list[list[int]], target: torch.Tensor) -> np.ndarray:
        """J(x) = cos(e(x), v) − λ·|x|."""
        return self.cosines(seqs, target) - self.penalty * np.array([len(s) for s in seqs])

    def gradient(self, seq: list[int], target: torch.Tensor) -> torch.Tensor:
        """∂cos(e(x), v)/∂(input embedding of x_t) for every position t, shape (|x|, d)."""
        ids = torch.tensor([[self.cls_id, *seq, self.sep_id]])
        x = self.emb[ids].clone().requires_grad_(True)
        v = self.encoder.forward_embeds(x, torch.ones_like(ids))
        (g,) = torch.autograd.grad(torch.nn.functional.cosine_similarity(v, target).sum(), x)
        self.forward_passes += 1
        return g[0, 1:-1]

    def proposals(self, seq: list[int], pos: int, g: torch.Tensor | None, pool: list[int] = ()) -> list[list[int]]:
        """HotFlip swaps at ``pos``, its deletion, and insertions before ``pos``; the words of ``pool`` (e.g. a
        bag-of-words guess) are proposed at every position too."""
        k = min(self.candidates, len(self.vocab))
        out: list[list[int]] = []
        if g is not None and pos < len(seq):
            gain = self.sub @ g[pos] - g[pos] @ self.emb[seq[pos]]
            words = dict.fromkeys([*self.vocab[torch.topk(gain, k).indices].tolist(), *pool])
            out.extend([*seq[:pos], w, *seq[pos + 1 :]] for w in words if w != seq[pos])
            if len(seq) > 1:
                out.append(seq[:pos] + seq[pos + 1 :])
        if len(seq) < self.max_len:
            near = g[max(0, pos - 1) : pos + 1].mean(0) if g is not None else self.sub.mean(0)
            words = dict.fromkeys([*self.vocab[torch.topk(self.sub @ near, k).indices].tolist(), *pool])
            out.extend([*seq[:pos], w, *seq[pos:]] for w in words)
        return out

    def search(self, seq: list[int], target: torch.Tensor, pool: list[int] = ()) -> tuple[list[int], float]:
        """Coordinate passes until no proposal raises J; returns the sequence and its cosine."""
        seq = list(seq)[: self.max_len]
        best = float(self.objective([seq], target)[0]) if seq else -np.inf
        for _ in range(self.passes):
            improved, pos = False, 0
            while pos <= len(seq):
                props = self.proposals(seq, pos, self.gradient(seq, target) if seq else None, pool)
                if props:
                    scores = self.objective(props, target)
                    b = int(scores.argmax())
                    if scores[b] > best + 1e-5:
                        shorter = len(props[b]) < len(seq)
                        seq, best, improved = props[b], float(scores[b]), True
                        if shorter:
                            continue
                pos += 1
            if not improved:
                break
        return seq, float(self.cosines([seq], target)[0])

    def invert(
        self, vectors: np.ndarray, init: list[str] | None = None, pools: list[str] | None = None
    ) -> tuple[list[str], list[float]]:
        """Recovered texts and their cosines; ``init``: one starting text per vector (else the empty text);
        ``pools``: per vector, words proposed at every position besides the HotFlip candidates."""
        v = torch.from_numpy(check_vectors(vectors, self.encoder.dim, "target vectors"))
        if init is not None and len(init) != len(v):
            raise LeaklabError(f"{len(init)} starting texts for {len(v)} vectors")
        tok = self.encoder.tokenizer
        starts = tok(init, add_special_tokens=False)["input_ids"] if init else [[] for _ in range(len(v))]
        extra = tok(pools, add_special_tokens=False)["input_ids"] if pools else [[] for _ in range(len(v))]
        start_passes = self.forward_passes
        texts, cosines = [], []
        for j in range(len(v)):
            seq, cos = self.search(starts[j], v[j : j + 1], extra[j])
            texts.append(tok.decode(seq, skip_special_tokens=True))
            cosines.append(cos)
        self.encoder.usage.queries += self.forward_passes - start_passes
        return texts, cosines


def make_whitebox(scn: Scenario, encoder: LocalEncoder) -> WhiteBoxInverter:
    """The white-box inverter with the scenario's options and a public-split vocabulary prior."""
    vocab_size = option(scn, "vocab", 8000)
    vocab = vocab_from_texts(encoder.tokenizer, scn.public_texts(), vocab_size) if vocab_size > 0 else None
    return WhiteBoxInverter(
        encoder,
        vocab,
        candidates=option(scn, "candidates", 24),
        length_penalty=option(scn, "length_penalty", 0.01),
        max_len=option(scn, "length", 24),
        passes=option(scn, "passes", 6),
    )


def bow_guesses(scn: Scenario, encoder: Encoder, vectors: np.ndarray) -> tuple[list[str], list[str]] | None:
    """Starting texts and per-vector word pools (top ``pool`` words) from a bag-of-words inverter trained on
    public pairs (option ``init=bow``; ``init=empty`` starts from nothing)."""
    if option(scn, "init", "bow") != "bow":
        return None
    from leaklab.attacks.embedding.bow import train_bow

    inv, _ = train_bow(scn, encoder)
    return inv.invert(vectors), inv.top_words(vectors, option(scn, "pool", 20))


@register_embed_attack(
    "whitebox",
    "batched coordinate search (HotFlip proposals, real-encoder scoring) from a bag-of-words start",
    "white-box encoder (gradients) + leaked vectors",
)
def evaluate(scn: Scenario) -> AttackReport:
    enc = require_local(scn.victim, "whitebox")
    sample, targets = victim_targets(scn, option(scn, "max_tokens", min(scn.max_tokens, 16)))
    before = enc.usage.snapshot()
    inv = make_whitebox(scn, enc)
    guesses = bow_guesses(scn, enc, targets)
    pred, cos = inv.invert(targets, *(guesses or (None, None)))
    metrics = score_inversion(pred, sample.texts, targets, enc)
    metrics["attack_cosine"] = float(np.mean(cos))
    return AttackReport(
        "whitebox",
        scn.to_dict(),
        metrics,
        enc.usage.since(before),
        0.0,
        {
            "vocab_prior": f"top {len(inv.vocab)} public-split whole-word token ids",
            "length_prior": f"≤ {inv.max_len} tokens, penalty {inv.penalty} per token",
            "start": "bag-of-words inverter (public pairs): start text + word pool" if guesses else "empty text",
        },
        examples(sample.texts, pred),
    )
