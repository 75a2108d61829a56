"""Bag-of-words inversion (Song & Raghunathan style): a multi-label model from a vector to the words it contains.

Trained only on (public text, vector) pairs: p(w ∈ x | φ(x)) = σ(MLP(φ(x)))_w with binary cross-entropy; a text
is recovered as the words with p above a threshold chosen on held-out public pairs for the best mean F1.
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
from leaklab.encoders import check_texts, check_vectors
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import score_inversion, word_prf, words


def build_vocab(texts: list[str], size: int, min_count: int = 2) -> list[str]:
    """The ``size`` most frequent words of ``texts`` seen at least ``min_count`` times."""
    counts = Counter(w for t in texts for w in words(t))
    return [w for w, c in counts.most_common(size) if c >= min_count]


def _mlp(dim: int, hidden: int, vocab: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, vocab))


class BagOfWordsInverter:
    """Vector -> set of vocabulary words."""

    kind = "bow"

    def __init__(self, dim: int, vocab: list[str], hidden: int = 1024, threshold: float = 0.3,
                 encoder: str = "") -> None:
        if not vocab:
            raise LeaklabError("bag-of-words vocabulary is empty: the public corpus has no repeated words")
        self.dim, self.vocab, self.hidden, self.threshold, self.encoder = dim, vocab, hidden, threshold, encoder
        self.index = {w: i for i, w in enumerate(vocab)}
        torch.manual_seed(0)
        self.model = _mlp(dim, hidden, len(vocab))

    def _targets(self, texts: list[str]) -> torch.Tensor:
        y = torch.zeros(len(texts), len(self.vocab))
        for i, t in enumerate(texts):
            for w in set(words(t)):
                j = self.index.get(w)
                if j is not None:
                    y[i, j] = 1.0
        return y

    def fit(self, texts: list[str], vectors: np.ndarray, epochs: int = 30, seconds: float = 120.0,
            batch_size: int = 256, lr: float = 3e-3, seed: int = 0) -> dict[str, Any]:
        """Train on public pairs (10% held out to choose the threshold); stops at ``epochs`` or ``seconds``."""
        texts = check_texts(texts, "training corpus")
        x = torch.from_numpy(check_vectors(vectors, self.dim, "training vectors"))
        if len(texts) != len(x):
            raise LeaklabError(f"{len(texts)} training texts but {len(x)} vectors")
        y = self._targets(texts)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=gen)
        n_val = max(1, len(x) // 10) if len(x) >= 20 else 0
        val, tr = perm[:n_val], perm[n_val:]
        pos = y[tr].mean(0).clamp(1e-4, 0.5)
        crit = nn.BCEWithLogitsLoss(pos_weight=((1 - pos) / pos).sqrt())
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        start, done = time.perf_counter(), 0
        self.model.train()
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=gen)]
            for i in range(0, len(order), batch_size):
                b = order[i:i + batch_size]
                loss = crit(self.model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
            if time.perf_counter() - start > seconds:
                break
        self.model.eval()
        if n_val:
            self.threshold = self._best_threshold([texts[i] for i in val.tolist()], x[val])
        return {"epochs": done, "train_pairs": len(tr), "seconds": round(time.perf_counter() - start, 2),
                "threshold": self.threshold, "vocab": len(self.vocab)}

    def _best_threshold(self, texts: list[str], x: torch.Tensor) -> float:
        probs = self.probabilities(x.numpy())
        grid = np.arange(0.1, 0.9, 0.05)
        f1 = [np.mean([word_prf(" ".join(self._words(p, t)), txt)[2] for p, txt in zip(probs, texts, strict=True)])
              for t in grid]
        return float(grid[int(np.argmax(f1))])

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(check_vectors(vectors, self.dim, "leaked vectors"))
        with torch.no_grad():
            return torch.sigmoid(self.model(x)).numpy()

    def _words(self, probs: np.ndarray, threshold: float) -> list[str]:
        idx = np.flatnonzero(probs >= threshold)
        if idx.size == 0:
            idx = np.array([int(probs.argmax())])
        return [self.vocab[i] for i in idx[np.argsort(-probs[idx])]]

    def invert(self, vectors: np.ndarray) -> list[str]:
        """Recovered bag of each vector, as a space-joined string of words (most probable first)."""
        return [" ".join(self._words(p, self.threshold)) for p in self.probabilities(vectors)]

    def save(self, folder: str | Path) -> Path:
        return save_inverter(folder, self.kind, self.model.state_dict(),
                             {"dim": self.dim, "vocab": self.vocab, "hidden": self.hidden,
                              "threshold": self.threshold, "encoder": self.encoder})

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
    texts, vecs = scn.public_pairs(enc)
    inv = BagOfWordsInverter(enc.dim, build_vocab(texts, option(scn, "vocab", 5000)),
                             option(scn, "hidden", 512), encoder=enc.name)
    info = inv.fit(texts, vecs, epochs=option(scn, "epochs", 40), seconds=option(scn, "train_seconds", 120.0),
                   seed=scn.seed)
    return inv, info


@register_embed_attack("bow", "vector -> vocabulary multi-label model trained on public (text, vector) pairs",
                       "black-box embed (public texts) + leaked vectors")
def evaluate(scn: Scenario) -> AttackReport:
    sample, targets = victim_targets(scn)
    before = scn.victim.usage.snapshot()
    inv, info = load_or_train(scn, BagOfWordsInverter.load, lambda: train_bow(scn))
    pred = inv.invert(targets)
    return AttackReport("bow", scn.to_dict(), score_inversion(pred, sample.texts), scn.victim.usage.since(before),
                        0.0, {"train_data": "public split only"}, examples(sample.texts, pred), info)
