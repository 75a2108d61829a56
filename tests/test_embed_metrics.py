"""Metric functions of the embedding suite against hand-computed and brute-force references."""

import itertools

import numpy as np
import pytest

from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import bleu, cosine_rows, roc_auc, score_inversion, tpr_at_fpr, word_prf


def brute_auc(scores, labels):
    """P(member score > non-member score) + ties/2, by counting every pair."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties on purpose
    labels = rng.integers(0, 2, size=40)
    labels[:2] = [0, 1]
    assert roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels))


def test_tpr_at_fpr_hand_case():
    # 100 non-members scored 0..99, 10 members: 5 above every non-member, 5 at the bottom.
    neg = list(range(100))
    pos = [200, 201, 202, 203, 204, -1, -2, -3, -4, -5]
    scores, labels = neg + pos, [0] * 100 + [1] * 10
    assert tpr_at_fpr(scores, labels, 0.0) == pytest.approx(0.5)
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(0.5)  # one more FP buys no member
    assert tpr_at_fpr(scores, labels, 1.0) == pytest.approx(1.0)


def test_auc_needs_both_classes():
    with pytest.raises(LeaklabError, match="both"):
        roc_auc([0.1, 0.2], [1, 1])


def test_word_prf_and_paired_scores():
    p, r, f = word_prf("the cat sat", "The cat sat on the mat")
    assert (p, r) == (1.0, 0.5)
    assert f == pytest.approx(2 / 3)
    out = score_inversion(["the cat sat on the mat", "dog"], ["The cat sat on the mat.", "a bird"])
    assert out["exact"] == 0.5 and out["token_f1"] == pytest.approx(0.5)
    assert out["per_item_f1"] == [1.0, 0.0]


def test_bleu_identical_is_100_and_disjoint_is_0():
    refs = ["a quiet film about grief and music", "the plot never quite holds together"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["x y z w v", "q r s t u"], refs) == pytest.approx(0.0)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    assert cosine_rows(a, b).tolist() == pytest.approx([1.0, -1.0])
