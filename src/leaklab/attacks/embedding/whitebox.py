"""White-box inversion: optimise a relaxed token distribution through the encoder, discretise, refine.

1. relax: for each position t a distribution p_t = softmax(z_t) over a vocabulary V; the input embedding is
   Σ_w p_t(w) E_w; minimise 1 − cos(e(p), v) with Adam (gradients through the encoder); in the last
   ``hard_share`` of the steps the forward pass uses argmax tokens with the soft gradient (straight-through).
2. discretise: x_t = argmax p_t.
3. refine: beam search over single-token swaps and deletions; candidates are ranked by the first-order
   (HotFlip) change of the loss, the best ``candidates`` are re-embedded and the ``beam`` closest kept.
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


def vocab_from_texts(tokenizer: Any, texts: list[str], size: int = 8000) -> list[int]:
    """The ``size`` most frequent non-special token ids of ``texts`` (the attacker's public prior)."""
    counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
    special = set(tokenizer.all_special_ids)
    return sorted(i for i, _ in counts.most_common(size + len(special)) if i not in special)[:size]


class WhiteBoxInverter:
    """Gradient-based inversion of a local encoder's vectors."""

    name = "whitebox"

    def __init__(
        self,
        encoder: Encoder,
        vocab_ids: list[int] | None = None,
        length: int = 16,
        steps: int = 150,
        lr: float = 0.1,
        refine_rounds: int = 12,
        candidates: int = 24,
        beam: int = 2,
        seed: int = 0,
        hard_share: float = 0.3,
    ) -> None:
        self.encoder: LocalEncoder = require_local(encoder, self.name)
        tok = self.encoder.tokenizer
        if vocab_ids is None:
            special = set(tok.all_special_ids)
            vocab_ids = [i for i in range(self.encoder.word_embeddings.shape[0]) if i not in special]
        if not vocab_ids:
            raise LeaklabError("white-box vocabulary is empty")
        if length < 1:
            raise LeaklabError(f"length must be >= 1, got {length}")
        self.vocab = torch.tensor(sorted(set(vocab_ids)))
        self.length, self.steps, self.lr = length, steps, lr
        self.rounds, self.candidates, self.beam, self.seed = refine_rounds, candidates, beam, seed
        self.hard_share = hard_share
        self.emb = self.encoder.word_embeddings.detach()
        self.sub = self.emb[self.vocab]
        self.cls_id, self.sep_id = tok.cls_token_id, tok.sep_token_id
        self.forward_passes = 0

    # -- 1+2: relaxed optimisation, then argmax
    def relax(self, targets: torch.Tensor) -> torch.Tensor:
        """Token logits (n, L, |V|) minimising 1 − cos(e(softmax(z) E_V), v)."""
        gen = torch.Generator().manual_seed(self.seed)
        n = targets.shape[0]
        z = (0.01 * torch.randn(n, self.length, len(self.vocab), generator=gen)).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        ends = self.emb[[self.cls_id, self.sep_id]]
        mask = torch.ones(n, self.length + 2, dtype=torch.long)
        for step in range(self.steps):
            p = torch.softmax(z, -1)
            if step >= self.steps * (1 - self.hard_share):  # straight-through: hard tokens forward, soft grads
                hard = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
                p = hard + p - p.detach()
            mid = p @ self.sub
            x = torch.cat([ends[0].expand(n, 1, -1), mid, ends[1].expand(n, 1, -1)], 1)
            loss = (1 - torch.nn.functional.cosine_similarity(self.encoder.forward_embeds(x, mask), targets)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.forward_passes += n
        return z.detach()

    # -- 3: beam refinement
    def _cosines(self, seqs: list[list[int]], target: torch.Tensor) -> torch.Tensor:
        vecs = torch.from_numpy(self.encoder.embed_ids(seqs))
        self.forward_passes += len(seqs)
        return torch.nn.functional.cosine_similarity(vecs, target.expand_as(vecs))

    def _swap_gains(self, seq: list[int], target: torch.Tensor) -> torch.Tensor:
        """First-order loss decrease of putting vocab word w at position t: −(g_{t,w} − g_{t,x_t})."""
        ids = torch.tensor([[self.cls_id, *seq, self.sep_id]])
        onehot = torch.zeros(len(seq), len(self.vocab))
        pos = {int(v): i for i, v in enumerate(self.vocab.tolist())}
        for t, i in enumerate(seq):
            if i in pos:
                onehot[t, pos[i]] = 1.0
        onehot.requires_grad_(True)
        mid = onehot @ self.sub
        missing = torch.tensor([i not in pos for i in seq])
        mid = torch.where(missing[:, None], self.emb[torch.tensor(seq)], mid)
        x = torch.cat([self.emb[ids[0, :1]], mid, self.emb[ids[0, -1:]]], 0)[None]
        loss = 1 - torch.nn.functional.cosine_similarity(self.encoder.forward_embeds(x, torch.ones_like(ids)), target)
        (g,) = torch.autograd.grad(loss.sum(), onehot)
        current = (g * onehot.detach()).sum(1, keepdim=True)
        return -(g - current)

    def _expand(self, seq: list[int], target: torch.Tensor) -> list[list[int]]:
        gains = self._swap_gains(seq, target)
        k = min(self.candidates, gains.numel())
        top = torch.topk(gains.flatten(), k).indices
        out = []
        for flat in top.tolist():
            t, w = divmod(flat, len(self.vocab))
            cand = list(seq)
            cand[t] = int(self.vocab[w])
            if cand != seq:
                out.append(cand)
        if len(seq) > 1:
            out.extend(seq[:t] + seq[t + 1 :] for t in range(len(seq)))
        return out

    def refine(self, seq: list[int], target: torch.Tensor) -> tuple[list[int], float]:
        beams = [(float(self._cosines([seq], target)[0]), seq)]
        for _ in range(self.rounds):
            pool: dict[tuple[int, ...], float] = {tuple(s): c for c, s in beams}
            for _, s in beams:
                cands = [c for c in self._expand(s, target) if tuple(c) not in pool]
                if cands:
                    for c, cos in zip(cands, self._cosines(cands, target).tolist(), strict=True):
                        pool[tuple(c)] = cos
            best = sorted(((c, list(s)) for s, c in pool.items()), key=lambda cs: -cs[0])[: self.beam]
            if best[0][0] <= beams[0][0] + 1e-6:
                beams = best
                break
            beams = best
        return beams[0][1], beams[0][0]

    def invert(self, vectors: np.ndarray, batch: int = 16) -> tuple[list[str], list[float]]:
        v = torch.from_numpy(check_vectors(vectors, self.encoder.dim, "target vectors"))
        texts, cosines = [], []
        for i in range(0, len(v), batch):
            tgt = v[i : i + batch]
            z = self.relax(tgt)
            init = self.vocab[z.argmax(-1)]
            for j in range(len(tgt)):
                seq, cos = self.refine(init[j].tolist(), tgt[j : j + 1])
                texts.append(self.encoder.tokenizer.decode(seq, skip_special_tokens=True))
                cosines.append(cos)
        self.encoder.usage.queries += self.forward_passes
        return texts, cosines


@register_embed_attack(
    "whitebox",
    "relaxed token distributions optimised through a local encoder + beam swaps",
    "white-box encoder (gradients) + leaked vectors",
)
def evaluate(scn: Scenario) -> AttackReport:
    enc = require_local(scn.victim, "whitebox")
    sample, targets = victim_targets(scn, option(scn, "max_tokens", min(scn.max_tokens, 16)))
    before = enc.usage.snapshot()
    vocab_size = option(scn, "vocab", 8000)
    vocab = vocab_from_texts(enc.tokenizer, scn.public_texts(), vocab_size) if vocab_size > 0 else None
    inv = WhiteBoxInverter(
        enc,
        vocab,
        length=option(scn, "length", 16),
        steps=option(scn, "steps", 150),
        lr=option(scn, "lr", 0.1),
        refine_rounds=option(scn, "rounds", 12),
        candidates=option(scn, "candidates", 24),
        beam=option(scn, "beam", 2),
        seed=scn.seed,
        hard_share=option(scn, "hard_share", 0.3),
    )
    pred, cos = inv.invert(targets)
    metrics = score_inversion(pred, sample.texts, targets, enc)
    metrics["attack_cosine"] = float(np.mean(cos))
    return AttackReport(
        "whitebox",
        scn.to_dict(),
        metrics,
        enc.usage.since(before),
        0.0,
        {
            "vocab_prior": f"top {vocab_size} public-split token ids" if vocab else "full vocabulary",
            "length_prior": f"≤ {inv.length} tokens",
        },
        examples(sample.texts, pred),
    )
