"""Metrics of embedding attacks.

- Inversion (paired: recovery i is scored against true text i, no matching): token P/R/F1 on lower-cased words
  (multiset overlap, leaklab.metrics.token_prf), ROUGE-L F (rouge-score), BLEU (sacrebleu corpus BLEU, 0–100),
  exact match (same word sequence), and the cosine between the re-embedded recovery and the target vector.
- Membership: ROC AUC (sklearn) and TPR at a fixed FPR (largest TPR whose FPR <= the bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from leaklab.errors import LeaklabError
from leaklab.metrics.text import UnicodeTokenizer, rouge_scores, token_prf

_WORDS = UnicodeTokenizer()


def words(text: str) -> list[str]:
    """Lower-cased words (letters/digits; one per CJK character): the unit of token metrics here."""
    return _WORDS.tokenize(text)


def word_prf(pred: str, true: str) -> tuple[float, float, float]:
    """Multiset precision/recall/F1 of the words of ``pred`` against ``true``."""
    return token_prf(words(pred), words(true))  # type: ignore[arg-type]


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0–100) of paired predictions against single references."""
    import sacrebleu

    if not preds:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity cos(a_i, b_i)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1).clip(1e-12)
    nb = np.linalg.norm(b, axis=1).clip(1e-12)
    return (a * b).sum(1) / (na * nb)


def score_inversion(
    pred: Sequence[str], true: Sequence[str], target_vectors: np.ndarray | None = None, encoder: Any = None
) -> dict[str, Any]:
    """Paired inversion scores; with an encoder and targets, also the cosine of the re-embedded recovery
    (those embedding calls are the scorer's, not the attacker's: usage is restored afterwards)."""
    if len(pred) != len(true):
        raise LeaklabError(f"{len(pred)} recoveries for {len(true)} targets")
    if not true:
        raise LeaklabError("nothing to score: no targets")
    prf = np.array([word_prf(p, t) for p, t in zip(pred, true, strict=True)])
    rl = np.array([rouge_scores(p, t)["rougeL"] for p, t in zip(pred, true, strict=True)])
    exact = np.array([words(p) == words(t) for p, t in zip(pred, true, strict=True)])
    out: dict[str, Any] = {
        "n": len(true),
        "token_precision": float(prf[:, 0].mean()),
        "token_recall": float(prf[:, 1].mean()),
        "token_f1": float(prf[:, 2].mean()),
        "rougeL": float(rl.mean()),
        "bleu": bleu(pred, true),
        "exact": float(exact.mean()),
        "per_item_f1": prf[:, 2].round(4).tolist(),
    }
    if encoder is not None and target_vectors is not None:
        before = encoder.usage.snapshot()
        re_emb = encoder.embed([p if p.strip() else "." for p in pred])
        encoder.usage.queries, encoder.usage.calls, encoder.usage.tokens = (
            before.queries,
            before.calls,
            before.tokens,
        )
        out["cosine"] = float(cosine_rows(re_emb, target_vectors).mean())
    return out


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a random member > score of a random non-member) (+ ties / 2)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    if y.min() == y.max():
        raise LeaklabError("AUC needs both members (1) and non-members (0)")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[int], fpr: float = 0.01) -> float:
    """Largest true-positive rate over thresholds whose false-positive rate is <= ``fpr``."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    if y.min() == y.max():
        raise LeaklabError("TPR@FPR needs both members (1) and non-members (0)")
    f, t, _ = roc_curve(y, np.asarray(scores, dtype=np.float64))
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def membership_scores(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    return {
        "auc": roc_auc(scores, labels),
        "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(scores, labels, 0.001),
        "members": int(np.sum(labels)),
        "non_members": int(len(labels) - np.sum(labels)),
    }
