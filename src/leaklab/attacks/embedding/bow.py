"""Bag-of-words inversion (Song & Raghunathan style): a multi-label model from a vector to the words it contains.

Trained only on (public text, vector) pairs, either

- ``hidden=0`` (default): a linear probe in closed form, W = (XᵀX + λI)⁻¹ XᵀY (Y: word-presence matrix), or
- ``hidden>0``: p(w ∈ x | φ(x)) = σ(MLP(φ(x)))_w trained with binary cross-entropy.

A text is recovered as the words scoring above a threshold; λ and the threshold are chosen on held-out public
pairs for the best mean word F1.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leaklab.attacks.embedding.registry import (
    AttackReport,
    Scenario,
    examples,
    load_inverter_files,
    load_or_train,
    option,
    register_embed_attack,
    save_inverter,
    victim_targets,
)
from leaklab.encoders import check_pairs, check_vectors
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import score_inversion, word_prf, words


def build_vocab(texts: list[str], size: int, min_count: int = 2) -> list[str]:
    """The ``size`` most frequent words of ``texts`` seen at least ``min_count`` times."""
    counts = Counter(w for t in texts for w in words(t))
    return [w for w, c in counts.most_common(size) if c >= min_count]


def _mlp(dim: int, hidden: int, vocab: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, vocab),
    )


class BagOfWordsInverter:
    """Vector -> set of vocabulary words."""

    kind = "bow"

    def __init__(self, dim: int, vocab: list[str], hidden: int = 0, threshold: float = 0.3, encoder: str = "") -> None:
        if not vocab:
            raise LeaklabError("bag-of-words vocabulary is empty: the public corpus has no repeated words")
        self.dim, self.vocab, self.hidden, self.threshold, self.encoder = (
            dim,
            vocab,
            hidden,
            threshold,
            encoder,
        )
        self.index = {w: i for i, w in enumerate(vocab)}
        torch.manual_seed(0)
        self.model = _mlp(dim, hidden, len(vocab)) if hidden > 0 else nn.Linear(dim, len(vocab))

    def _targets(self, texts: list[str]) -> torch.Tensor:
        y = torch.zeros(len(texts), len(self.vocab))
        for i, t in enumerate(texts):
            for w in set(words(t)):
                j = self.index.get(w)
                if j is not None:
                    y[i, j] = 1.0
        return y

    def fit(
        self,
        texts: list[str],
        vectors: np.ndarray,
        epochs: int = 30,
        seconds: float = 120.0,
        batch_size: int = 256,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Train on public pairs (10% held out to choose the threshold); stops at ``epochs`` or ``seconds``."""
        texts, pair_vectors = check_pairs(texts, vectors, self.dim)
        x = torch.from_numpy(pair_vectors)
        y = self._targets(texts)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=gen)
        n_val = max(1, len(x) // 10) if len(x) >= 20 else 0
        val, tr = perm[:n_val], perm[n_val:]
        val_texts = [texts[i] for i in val.tolist()]
        if self.hidden <= 0:
            return self._fit_ridge(x[tr], y[tr], val_texts, x[val])
        pos = y[tr].mean(0).clamp(1e-4, 0.5)
        crit = nn.BCEWithLogitsLoss(pos_weight=((1 - pos) / pos).sqrt())
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        start, done = time.perf_counter(), 0
        self.model.train()
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=gen)]
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                loss = crit(self.model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
            if time.perf_counter() - start > seconds:
                break
        self.model.eval()
        if n_val:
            self.threshold = self._best_threshold(val_texts, x[val])[1]
        return {
            "model": "mlp",
            "epochs": done,
            "train_pairs": len(tr),
            "seconds": round(time.perf_counter() - start, 2),
            "threshold": self.threshold,
            "vocab": len(self.vocab),
        }

    def _fit_ridge(self, x: torch.Tensor, y: torch.Tensor, val_texts: list[str], x_val: torch.Tensor) -> dict[str, Any]:
        """Closed-form W = (XᵀX + λI)⁻¹ XᵀY for λ in a grid; λ and threshold picked by held-out word F1."""
        start = time.perf_counter()
        xd = x.double()
        gram, xty = xd.T @ xd, xd.T @ y.double()
        best = (-1.0, 0.0, 0.0)
        for lam in (0.01, 0.1, 1.0):
            w = torch.linalg.solve(gram + lam * torch.eye(self.dim, dtype=gram.dtype), xty)
            with torch.no_grad():
                self.model.weight.copy_(w.T.float())
                self.model.bias.zero_()
            f1, threshold = self._best_threshold(val_texts, x_val) if val_texts else (0.0, self.threshold)
            if f1 > best[0]:
                best = (f1, lam, threshold)
        _, lam, self.threshold = best
        w = torch.linalg.solve(gram + lam * torch.eye(self.dim, dtype=gram.dtype), xty)
        with torch.no_grad():
            self.model.weight.copy_(w.T.float())
        return {
            "model": "ridge",
            "lambda": lam,
            "train_pairs": len(x),
            "held_out_f1": round(best[0], 4),
            "seconds": round(time.perf_counter() - start, 2),
            "threshold": self.threshold,
            "vocab": len(self.vocab),
        }

    def _best_threshold(self, texts: list[str], x: torch.Tensor) -> tuple[float, float]:
        """(best mean word F1, its threshold) over a grid, on held-out pairs."""
        probs = self.probabilities(x.numpy())
        grid = np.arange(0.05, 0.9, 0.05)
        f1 = [
            np.mean([word_prf(" ".join(self._words(p, t)), txt)[2] for p, txt in zip(probs, texts, strict=True)])
            for t in grid
        ]
        return float(max(f1)), float(grid[int(np.argmax(f1))])

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Word scores: σ(logits) for the MLP, the linear probe's output for the closed-form model."""
        x = torch.from_numpy(check_vectors(vectors, self.dim, "leaked vectors"))
        with torch.no_grad():
            out = self.model(x)
            return (torch.sigmoid(out) if self.hidden > 0 else out).numpy()

    def _words(self, probs: np.ndarray, threshold: float) -> list[str]:
        idx = np.flatnonzero(probs >= threshold)
        if idx.size == 0:
            idx = np.array([int(probs.argmax())])
        return [self.vocab[i] for i in idx[np.argsort(-probs[idx])]]

    def invert(self, vectors: np.ndarray) -> list[str]:
        """Recovered bag of each vector, as a space-joined string of words (most probable first)."""
        return [" ".join(self._words(p, self.threshold)) for p in self.probabilities(vectors)]

    def top_words(self, vectors: np.ndarray, k: int) -> list[str]:
        """The ``k`` highest-scoring words of each vector, space-joined."""
        return [" ".join(self.vocab[i] for i in np.argsort(-p)[:k]) for p in self.probabilities(vectors)]

    def save(self, folder: str | Path) -> Path:
        return save_inverter(
            folder,
            self.kind,
            self.model.state_dict(),
            {
                "dim": self.dim,
                "vocab": self.vocab,
                "hidden": self.hidden,
                "threshold": self.threshold,
                "encoder": self.encoder,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> BagOfWordsInverter:
        state, cfg = load_inverter_files(folder, cls.kind)
        inv = cls(cfg["dim"], cfg["vocab"], cfg["hidden"], cfg["threshold"], cfg.get("encoder", ""))
        inv.model.load_state_dict(state)
        inv.model.eval()
        return inv


def train_bow(scn: Scenario, encoder: Any = None) -> tuple[BagOfWordsInverter, dict[str, Any]]:
    """Fit a bag-of-words inverter on the scenario's public pairs through ``encoder`` (default: the victim)."""
    enc = encoder or scn.victim
    texts, vecs = scn.public_pairs(enc, extra=option(scn, "extra_corpora", ""))
    inv = BagOfWordsInverter(
        enc.dim, build_vocab(texts, option(scn, "vocab", 5000)), option(scn, "hidden", 0), encoder=enc.name
    )
    info = inv.fit(
        texts,
        vecs,
        epochs=option(scn, "epochs", 40),
        seconds=option(scn, "train_seconds", 120.0),
        seed=scn.seed,
    )
    return inv, info


@register_embed_attack(
    "bow",
    "vector -> vocabulary multi-label model trained on public (text, vector) pairs",
    "black-box embed (public texts) + leaked vectors",
)
def evaluate(scn: Scenario) -> AttackReport:
    sample, targets = victim_targets(scn)
    before = scn.victim.usage.snapshot()
    inv, info = load_or_train(scn, BagOfWordsInverter.load, lambda: train_bow(scn))
    pred = inv.invert(targets)
    return AttackReport(
        "bow",
        scn.to_dict(),
        score_inversion(pred, sample.texts),
        scn.victim.usage.since(before),
        0.0,
        {"train_data": "public split only"},
        examples(sample.texts, pred),
        info,
    )
