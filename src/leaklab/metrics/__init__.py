"""Reconstruction metrics, always after a one-to-one matching of recovered to true items."""

from leaklab.metrics.text import (
    BatchScore,
    PairScore,
    match_texts,
    rouge_scores,
    score_bag,
    score_batch,
    token_prf,
)

__all__ = ["BatchScore", "PairScore", "match_texts", "rouge_scores", "score_bag", "score_batch", "token_prf"]
