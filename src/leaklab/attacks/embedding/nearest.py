"""Nearest-neighbour / fingerprint attack: which candidate documents do leaked vectors come from?

The attacker embeds a candidate corpus through the same encoder (black-box, counted) and ranks candidates
by cosine to each leaked vector; a candidate at cos >= ``near_exact`` is declared present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leaklab.attacks.embedding.access import Access, Prediction, PublicData, vectors_in_encoder_space
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, at_least
from leaklab.core import Config, option
from leaklab.encoders import Encoder, cached_embed, check_texts, check_vectors


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x_i / ||x_i|| (zero rows stay zero)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


@dataclass
class NeighbourResult:
    texts: list[str]
    top_indices: np.ndarray
    top_scores: np.ndarray
    present: np.ndarray

    @property
    def best_score(self) -> np.ndarray:
        return self.top_scores[:, 0]


class NearestNeighbour:
    """Rank candidates by cos(φ(c), v) for each leaked vector v."""

    name = "nearest"

    def __init__(
        self,
        encoder: Encoder,
        candidates: list[str],
        near_exact: float = 0.999,
        candidate_vectors: np.ndarray | None = None,
    ) -> None:
        self.encoder = encoder
        self.candidates = check_texts(candidates, "candidate corpus")
        vecs = candidate_vectors if candidate_vectors is not None else cached_embed(encoder, self.candidates)
        self.matrix = unit_rows(check_vectors(vecs, encoder.dim, "candidate vectors"))
        self.near_exact = near_exact

    def run(self, vectors: np.ndarray, k: int = 5) -> NeighbourResult:
        v = unit_rows(check_vectors(vectors, self.encoder.dim, "leaked vectors"))
        sims = v @ self.matrix.T
        k = min(k, sims.shape[1])
        top = np.argsort(-sims, axis=1)[:, :k]
        scores = np.take_along_axis(sims, top, axis=1)
        return NeighbourResult([self.candidates[i] for i in top[:, 0]], top, scores, scores[:, 0] >= self.near_exact)


@dataclass(frozen=True)
class NearestConfig(Config):
    """Options of the nearest-neighbour attack."""

    candidates: int = option(1000, "public distractor texts in the candidate list (at least 1)")
    near_exact: float = option(0.999, "cosine at or above which a candidate is declared present")
    k: int = option(5, "candidates ranked per leaked vector (recall@k; at least 1)")

    def __post_init__(self) -> None:
        at_least(self, 1, "candidates", "k")


ACCESS = "black-box embed + leaked vectors + known candidate documents"


@EMBED_ATTACKS.register("nearest", config=NearestConfig, access=ACCESS, case="nearest")
def attack(access: Access, public: PublicData, cfg: NearestConfig) -> Prediction:
    """Fingerprint leaked vectors against a candidate corpus (exact / near-exact).

    The candidates are public distractors plus the documents the scenario grants as known (hint
    ``known_documents``: half of the leaked ones in the built-in scenario). Leaked pairs, where granted, map the
    leaked vectors into the encoder's space first."""
    enc = access.need("encoder")
    candidates = public.texts(limit=cfg.candidates) + list(access.hints.get("known_documents", []))
    nn = NearestNeighbour(enc, candidates, near_exact=cfg.near_exact)
    res = nn.run(vectors_in_encoder_space(access), k=cfg.k)
    return Prediction(
        texts=res.texts,
        ranked=[[nn.candidates[i] for i in row] for row in res.top_indices],
        scores={"best": res.best_score, "declared_present": res.present},
        measures={"candidates": len(nn.candidates)},
    )
