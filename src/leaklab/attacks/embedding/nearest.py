"""Nearest-neighbour / fingerprint attack: which candidate documents do leaked vectors come from?

The attacker embeds a candidate corpus through the same encoder (black-box, counted) and ranks candidates
by cosine to each leaked vector; a candidate at cos >= ``near_exact`` is declared present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leaklab.attacks.embedding.registry import EMBED_ATTACKS, AttackReport, Scenario, at_least, examples, victim_targets
from leaklab.core import Config, option
from leaklab.encoders import Encoder, cached_embed, check_texts, check_vectors
from leaklab.metrics.embedding import membership_scores, score_inversion


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


ACCESS = "black-box embed + leaked vectors"


@EMBED_ATTACKS.register("nearest", config=NearestConfig, access=ACCESS)
def evaluate(scn: Scenario, cfg: NearestConfig) -> AttackReport:
    """Fingerprint leaked vectors against a candidate corpus (exact / near-exact).

    Half of the leaked documents are in the attacker's candidate list (with public distractors)."""
    enc = scn.victim
    sample, targets = victim_targets(scn)
    before = enc.usage.snapshot()
    rng = np.random.default_rng(scn.seed)
    present = rng.random(len(sample.texts)) < 0.5
    distractors = scn.public_texts(limit=cfg.candidates)
    candidates = distractors + [t for t, p in zip(sample.texts, present, strict=True) if p]
    attack = NearestNeighbour(enc, candidates, near_exact=cfg.near_exact)
    res = attack.run(targets, k=cfg.k)
    truth_idx = {t: i for i, t in enumerate(attack.candidates)}
    hit_at_k = [truth_idx.get(t, -1) in row for t, row in zip(sample.texts, res.top_indices, strict=True)]
    flagged = res.present
    metrics = {
        "present": int(present.sum()),
        "absent": int((~present).sum()),
        "detect_precision": float((flagged & present).sum() / max(flagged.sum(), 1)),
        "detect_recall": float((flagged & present).sum() / max(present.sum(), 1)),
        "exact_recovered_of_present": float(
            np.mean([r == t for r, t, p in zip(res.texts, sample.texts, present, strict=True) if p] or [0.0])
        ),
        "recall_at_k_present": float(np.mean([h for h, p in zip(hit_at_k, present, strict=True) if p] or [0.0])),
        "candidates": len(attack.candidates),
    }
    if present.any() and (~present).any():
        metrics.update({f"presence_{k}": v for k, v in membership_scores(res.best_score, present.astype(int)).items()})
    absent_scores = (
        score_inversion(
            [r for r, p in zip(res.texts, present, strict=True) if not p],
            [t for t, p in zip(sample.texts, present, strict=True) if not p],
        )
        if (~present).any()
        else {}
    )
    metrics["absent_nearest_token_f1"] = absent_scores.get("token_f1", 0.0)
    return AttackReport(
        "nearest",
        scn.to_dict(),
        metrics,
        enc.usage.since(before),
        {"candidate_corpus": "public split + half of the leaked documents"},
        examples(sample.texts, res.texts),
    )
