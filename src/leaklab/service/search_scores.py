"""What a similarity search returns: top-k ids with exact, noised or quantised scores, or ids only (ranks).

One code path for the service's ``/v1/search`` and the local index of the attacks, so that both answer the
same query the same way. Noise and quantisation act on every document's score before the top-k is taken:
the returned order is the defended one, and so is the retrieval quality a legitimate user gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leaklab.errors import LeaklabError

Hit = tuple[str, float | None]


@dataclass(frozen=True)
class ScoreView:
    """scores=False: ids only; noise: σ of Gaussian noise on each score; step: scores rounded to multiples of
    ``step``; scores are finally rounded to ``decimals``."""

    scores: bool = True
    noise: float = 0.0
    step: float = 0.0
    decimals: int = 4

    def __post_init__(self) -> None:
        if self.noise < 0 or self.step < 0:
            raise LeaklabError(f"search scores: noise and step must be >= 0 (got {self.noise}, {self.step})")

    def label(self) -> str:
        """How the request log names this view."""
        parts = [f"scores-rounded({self.decimals})" if self.scores else "ids-only"]
        if self.noise:
            parts.append(f"score-noise(sigma={self.noise:g})")
        if self.step:
            parts.append(f"score-step({self.step:g})")
        return "+".join(parts)

    def defended(self, sims: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noised, then quantised similarities (queries × documents)."""
        out = np.asarray(sims, dtype=np.float64)
        if self.noise:
            out = out + rng.standard_normal(out.shape) * self.noise
        if self.step:
            out = np.round(out / self.step) * self.step
        return out

    def top_k(self, sims: np.ndarray, ids: list[str], k: int, rng: np.random.Generator) -> list[list[Hit]]:
        """Per query row, the k best documents by defended score (ties: lower index first), with their scores
        unless ids only."""
        if not ids:
            return [[] for _ in range(len(sims))]
        scores = self.defended(sims, rng)
        k = min(k, len(ids))
        out = []
        for row in scores:
            idx = np.argpartition(-row, k - 1)[:k]
            idx = idx[np.lexsort((idx, -row[idx]))]
            out.append([(ids[i], round(float(row[i]), self.decimals) if self.scores else None) for i in idx])
        return out
