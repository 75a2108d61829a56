"""Bag-of-words inversion (Song & Raghunathan style): a multi-label model from a vector to the words it contains.

Trained only on (public text, vector) pairs, either

- ``hidden=0`` (default): a linear probe in closed form, W = (XᵀX + λI)⁻¹ XᵀY (Y: word-presence matrix), or
- ``hidden>0``: p(w ∈ x | φ(x)) = σ(MLP(φ(x)))_w trained with binary cross-entropy.

Decoding (``decode="ef1"``, the default): a forward dictionary D (one atom per word, ridge fit of
φ(x) ≈ Σ_w c_w(x)/|x| · D_w on length-normalised word counts) gives non-negative least-squares word weights
a = argmin_{a≥0} ‖Σ^-1/2 (φ - Dᵀa)‖ (Σ: covariance of the forward model's training residuals) over the probe's
top candidates, rescaled to the predicted length L (a ridge fit of log |x| on φ); the scores
s = (p + α·min(a, 1)) / (1 + α) are sorted and the top k kept, k maximising the expected F1
2·Σ_{i≤k} s_i / (k + γL). α and γ are chosen on held-out public pairs (``decode="threshold"``: words with p above
a held-out threshold, the older rule). Training texts may be augmented with spans and word-dropped copies of
public texts (option ``augment``), each embedded (counted queries).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from leaklab.attacks.embedding.access import Access, Prediction, PublicData, vectors_in_encoder_space
from leaklab.attacks.embedding.registry import (
    EMBED_ATTACKS,
    SavedInverter,
    load_inverter_files,
    load_or_train,
    save_inverter,
    span_augment,
)
from leaklab.core import Config, option
from leaklab.encoders import Encoder, check_pairs, check_vectors
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import word_prf, words


def build_vocab(texts: list[str], size: int, min_count: int = 2) -> list[str]:
    """The ``size`` most frequent words of ``texts`` seen at least ``min_count`` times."""
    counts = Counter(w for t in texts for w in words(t))
    return [w for w, c in counts.most_common(size) if c >= min_count]


_FORWARD, _LENGTH, _WHITEN = "forward.D", "length.w", "forward.whiten"


def whitening(cov: torch.Tensor, shrink: float = 0.01) -> torch.Tensor:
    """Σ_s^-1/2 with Σ_s = Σ + shrink·tr(Σ)/d·I (symmetric inverse square root by eigendecomposition)."""
    d = cov.shape[0]
    cov = cov.double() + shrink * float(torch.trace(cov.double())) / d * torch.eye(d, dtype=torch.float64)
    ev, u = torch.linalg.eigh(cov)
    return ((u * ev.clamp_min(1e-12).rsqrt()) @ u.T).float()


def expected_f1_k(scores: np.ndarray, length: float) -> int:
    """k maximising the expected F1 2·Σ_{i≤k} s_i / (k + L) of keeping the k best of ``scores`` (sorted
    descending, each a word's presence probability; L the expected true word count); at least 1."""
    if scores.size == 0:
        return 0
    gain = np.cumsum(scores) / (np.arange(1, scores.size + 1) + max(length, 0.0))
    return int(np.argmax(gain)) + 1


def _mlp(dim: int, hidden: int, vocab: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, vocab),
    )


DECODERS = ("ef1", "threshold")
CANDIDATES = 200  # words scored by the probe that the non-negative least squares may use


class BagOfWordsInverter:
    """Vector -> set of vocabulary words."""

    kind = "bow"

    def __init__(
        self,
        dim: int,
        vocab: list[str],
        hidden: int = 0,
        threshold: float = 0.3,
        encoder: str = "",
        decode: str = "ef1",
        mix: float = 0.0,
        length_scale: float = 1.0,
    ) -> None:
        if not vocab:
            raise LeaklabError("bag-of-words vocabulary is empty: the public corpus has no repeated words")
        self.dim, self.vocab, self.hidden, self.threshold, self.encoder = (
            dim,
            vocab,
            hidden,
            threshold,
            encoder,
        )
        if decode not in DECODERS:
            raise LeaklabError(f"unknown bag-of-words decoding '{decode}'; valid: {', '.join(DECODERS)}")
        self.decode, self.mix, self.length_scale = decode, mix, length_scale
        self.index = {w: i for i, w in enumerate(vocab)}
        self.forward = torch.zeros(len(vocab), dim)  # D: word atoms of the forward model
        self.length_w = torch.zeros(dim + 1)  # log-length regressor on [φ, 1]
        self.whiten = torch.eye(dim)  # Σ^-1/2 of the forward model's residuals
        torch.manual_seed(0)
        self.model = _mlp(dim, hidden, len(vocab)) if hidden > 0 else nn.Linear(dim, len(vocab))

    def _targets(self, texts: list[str]) -> Any:
        """Sparse (texts x vocab) word-presence matrix."""
        from scipy.sparse import csr_matrix

        rows, cols = [], []
        for i, t in enumerate(texts):
            for j in {self.index[w] for w in words(t) if w in self.index}:
                rows.append(i)
                cols.append(j)
        return csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(texts), len(self.vocab)))

    def fit(
        self,
        texts: list[str],
        vectors: np.ndarray,
        epochs: int = 30,
        seconds: float = 120.0,
        batch_size: int = 256,
        lr: float = 3e-3,
        seed: int = 0,
        val: tuple[list[str], np.ndarray] | None = None,
        forward_lambda: float = 0.03,
    ) -> dict[str, Any]:
        """Train on public pairs (``val``, else 10% of them, held out to choose the decoding); the MLP stops at
        ``epochs`` or ``seconds``."""
        start = time.perf_counter()
        texts, pair_vectors = check_pairs(texts, vectors, self.dim)
        x = torch.from_numpy(pair_vectors)
        gen = torch.Generator().manual_seed(seed)
        if val is None:
            perm = torch.randperm(len(x), generator=gen)
            n_val = max(1, len(x) // 10) if len(x) >= 20 else 0
            val_texts, x_val = [texts[i] for i in perm[:n_val].tolist()], x[perm[:n_val]]
            texts, x = [texts[i] for i in perm[n_val:].tolist()], x[perm[n_val:]]
        else:
            val_texts, val_vectors = check_pairs(val[0], val[1], self.dim)
            x_val = torch.from_numpy(val_vectors)
        info = self._fit_probe(texts, x, val_texts, x_val, epochs, seconds, batch_size, lr, gen)
        self.fit_forward(texts, x, forward_lambda)
        if val_texts and self.decode == "ef1":
            info["held_out_f1"] = round(self._choose_decoding(val_texts, x_val), 4)
        info |= {"decode": self.decode, "mix": self.mix, "length_scale": self.length_scale}
        info["seconds"] = round(time.perf_counter() - start, 2)
        return info

    def _fit_probe(
        self,
        texts: list[str],
        x: torch.Tensor,
        val_texts: list[str],
        x_val: torch.Tensor,
        epochs: int,
        seconds: float,
        batch_size: int,
        lr: float,
        gen: torch.Generator,
    ) -> dict[str, Any]:
        """The word-presence probe: closed-form ridge (``hidden=0``) or the MLP trained with BCE."""
        y = self._targets(texts)
        if self.hidden <= 0:
            return self._fit_ridge(x, y, val_texts, x_val)
        tr = torch.arange(len(x))
        pos = torch.from_numpy(np.asarray(y.mean(0)).ravel()).float().clamp(1e-4, 0.5)
        crit = nn.BCEWithLogitsLoss(pos_weight=((1 - pos) / pos).sqrt())
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        start, done = time.perf_counter(), 0
        self.model.train()
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=gen)]
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                loss = crit(self.model(x[b]), torch.from_numpy(y[b.numpy()].toarray()))
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
            if time.perf_counter() - start > seconds:
                break
        self.model.eval()
        if val_texts:
            self.threshold = self._best_threshold(val_texts, x_val)[1]
        return {
            "model": "mlp",
            "epochs": done,
            "train_pairs": len(tr),
            "threshold": self.threshold,
            "vocab": len(self.vocab),
        }

    def _counts(self, texts: list[str]) -> Any:
        """Sparse (texts x vocab) matrix of word counts divided by the text's word count."""
        from scipy.sparse import csr_matrix

        rows, cols, vals = [], [], []
        for i, t in enumerate(texts):
            ws = words(t)
            for w, c in Counter(ws).items():
                j = self.index.get(w)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
                    vals.append(c / len(ws))
        return csr_matrix((vals, (rows, cols)), shape=(len(texts), len(self.vocab)))

    def fit_forward(self, texts: list[str], x: torch.Tensor, lam: float = 0.03) -> None:
        """Forward dictionary D = (CᵀC + λI)⁻¹ CᵀΦ (C: length-normalised counts) and the ridge fit of log |x|
        on [Φ, 1]."""
        c = self._counts(texts)
        gram = torch.from_numpy((c.T @ c).toarray()).float()
        gram.diagonal().add_(lam)
        rhs = torch.from_numpy(np.asarray(c.T @ x.numpy().astype(np.float64))).float()
        self.forward = torch.linalg.solve(gram, rhs)
        resid = x.double() - torch.from_numpy(np.asarray(c @ self.forward.double().numpy()))
        self.whiten = whitening(resid.T @ resid / max(1, len(x)))
        xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        log_len = torch.tensor([np.log(max(1, len(words(t)))) for t in texts], dtype=torch.float64)
        self.length_w = torch.linalg.solve(
            xa.T @ xa + 1e-2 * torch.eye(self.dim + 1, dtype=xa.dtype), xa.T @ log_len
        ).float()

    def _weights(self, v: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(top candidate words by probe score, their NNLS weights a ≥ 0 rescaled to sum L, predicted length L)."""
        cand = np.argsort(-p)[:CANDIDATES]
        length = float(np.exp(np.append(v, 1.0) @ self.length_w.numpy().astype(np.float64)))
        w = self.whiten.numpy().astype(np.float64)
        a, _ = nnls(w @ self.forward.numpy()[cand].T.astype(np.float64), w @ v.astype(np.float64))
        return cand, a / max(float(a.sum()), 1e-12) * length, length

    def _ef1_words(
        self, cand: np.ndarray, p: np.ndarray, a: np.ndarray, length: float, mix: float, scale: float
    ) -> list[str]:
        """Words of s = (p + α·min(a, 1)) / (1 + α), the top k by expected F1."""
        s = (np.clip(p[cand], 0.0, 1.0) + mix * np.minimum(a, 1.0)) / (1.0 + mix)
        order = np.argsort(-s, kind="stable")
        return [self.vocab[cand[i]] for i in order[: expected_f1_k(s[order], scale * length)]]

    def _choose_decoding(self, texts: list[str], x: torch.Tensor) -> float:
        """Pick α (mix) and γ (length scale) of the ef1 decoding by held-out mean word F1; returns that F1."""
        vecs = x.numpy()
        probs = self.probabilities(vecs)
        parts = [self._weights(v, p) for v, p in zip(vecs, probs, strict=True)]
        best = (-1.0, 0.0, 1.0)
        for mix in (0.0, 0.25, 0.5, 1.0, 2.0):
            for scale in (0.8, 1.0, 1.2):
                f1 = np.mean(
                    [
                        word_prf(" ".join(self._ef1_words(c, p, a, n, mix, scale)), t)[2]
                        for (c, a, n), p, t in zip(parts, probs, texts, strict=True)
                    ]
                )
                if f1 > best[0]:
                    best = (float(f1), mix, scale)
        _, self.mix, self.length_scale = best
        return best[0]

    def _fit_ridge(self, x: torch.Tensor, y: Any, val_texts: list[str], x_val: torch.Tensor) -> dict[str, Any]:
        """Closed-form W = (XᵀX + λI)⁻¹ XᵀY for λ in a grid; λ and threshold picked by held-out word F1."""
        xd = x.double()
        xty = xd.T @ y.double() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y.T @ xd.numpy()).T)
        gram = xd.T @ xd
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
        """Recovered bag of each vector, as a space-joined string of words (highest score first)."""
        vecs = check_vectors(vectors, self.dim, "leaked vectors")
        probs = self.probabilities(vecs)
        if self.decode == "threshold":
            return [" ".join(self._words(p, self.threshold)) for p in probs]
        out = []
        for v, p in zip(vecs, probs, strict=True):
            cand, a, length = self._weights(v, p)
            out.append(" ".join(self._ef1_words(cand, p, a, length, self.mix, self.length_scale)))
        return out

    def top_words(self, vectors: np.ndarray, k: int) -> list[str]:
        """The ``k`` highest-scoring words of each vector, space-joined."""
        return [" ".join(self.vocab[i] for i in np.argsort(-p)[:k]) for p in self.probabilities(vectors)]

    def save(self, folder: str | Path) -> Path:
        return save_inverter(
            folder,
            self.kind,
            {**self.model.state_dict(), _FORWARD: self.forward, _LENGTH: self.length_w, _WHITEN: self.whiten},
            {
                "dim": self.dim,
                "vocab": self.vocab,
                "hidden": self.hidden,
                "threshold": self.threshold,
                "encoder": self.encoder,
                "decode": self.decode,
                "mix": self.mix,
                "length_scale": self.length_scale,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> BagOfWordsInverter:
        """A saved inverter; one saved before the ef1 decoding existed decodes by its threshold."""
        state, cfg = load_inverter_files(folder, cls.kind)
        has_forward = all(k in state for k in (_FORWARD, _LENGTH, _WHITEN))
        inv = cls(
            cfg["dim"],
            cfg["vocab"],
            cfg["hidden"],
            cfg["threshold"],
            cfg.get("encoder", ""),
            cfg.get("decode", "ef1") if has_forward else "threshold",
            float(cfg.get("mix", 0.0)),
            float(cfg.get("length_scale", 1.0)),
        )
        if has_forward:
            inv.forward, inv.length_w, inv.whiten = state.pop(_FORWARD), state.pop(_LENGTH), state.pop(_WHITEN)
        inv.model.load_state_dict(state)
        inv.model.eval()
        return inv


@dataclass(frozen=True)
class BowTraining(Config):
    """Options of training a bag-of-words inverter (the bow attack's, and the start of those that use one)."""

    vocab: int = option(8000, "most frequent public-split words the inverter can output")
    hidden: int = option(0, "hidden width of an MLP probe; 0: the closed-form ridge probe")
    decode: Literal["ef1", "threshold"] = option("ef1", "ef1: expected-F1 decoding; threshold: the older rule")
    augment: int = option(4, "span and word-drop copies per public text added as training pairs (embedded)")
    epochs: int = option(40, "MLP probe: most epochs")
    train_seconds: float = option(120.0, "MLP probe: training time budget in seconds")
    forward_lambda: float = option(0.03, "ridge λ of the forward word dictionary")
    extra_corpora: str = option("", "comma-separated corpora whose public sentences add training pairs")


@dataclass(frozen=True)
class BowConfig(SavedInverter, BowTraining):
    """Options of the bag-of-words attack."""


def train_bow(
    public: PublicData, opts: BowTraining | None, encoder: Encoder
) -> tuple[BagOfWordsInverter, dict[str, Any]]:
    """Fit a bag-of-words inverter (``opts``, default: the defaults) on public pairs made through ``encoder``."""
    from leaklab.encoders import cached_embed

    opts = opts or BowTraining()
    enc = encoder
    texts, vecs = public.pairs(enc, extra=opts.extra_corpora)
    n_val = len(texts) // 10 if len(texts) >= 20 else 0
    perm = np.random.default_rng(public.seed).permutation(len(texts))
    val_texts, tr_texts = [texts[i] for i in perm[:n_val]], [texts[i] for i in perm[n_val:]]
    aug = public.drop_private(span_augment(tr_texts, opts.augment, public.seed, set(val_texts)))
    inv = BagOfWordsInverter(
        enc.dim, build_vocab(tr_texts, opts.vocab), opts.hidden, encoder=enc.name, decode=opts.decode
    )
    aug_vecs = cached_embed(enc, aug) if aug else np.zeros((0, enc.dim), dtype=np.float32)
    info = inv.fit(
        tr_texts + aug,
        np.concatenate([vecs[perm[n_val:]], aug_vecs]),
        epochs=opts.epochs,
        seconds=opts.train_seconds,
        seed=public.seed,
        val=(val_texts, vecs[perm[:n_val]]) if n_val else None,
        forward_lambda=opts.forward_lambda,
    )
    return inv, info | {"public_pairs": len(tr_texts), "augmented_pairs": len(aug), "held_out_pairs": n_val}


ACCESS = "black-box embed (public texts) + leaked vectors"


@EMBED_ATTACKS.register("bow", config=BowConfig, access=ACCESS, case="inversion", needs=("encoder",))
def attack(access: Access, public: PublicData, cfg: BowConfig) -> Prediction:
    """Vector -> vocabulary multi-label model trained on public (text, vector) pairs (leaked pairs, where
    granted, map the leaked vectors into the encoder's space first)."""
    enc = access.need("encoder")
    inv, info = load_or_train(enc, cfg, BagOfWordsInverter.load, lambda: train_bow(public, cfg, enc))
    pred = inv.invert(vectors_in_encoder_space(access))
    return Prediction(texts=pred, notes={"train_data": "public split only"}, info=info)
