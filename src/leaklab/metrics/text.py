"""Text reconstruction metrics.

Definitions (each aggregate averages over max(#true, #recovered) slots, so unmatched items score 0):

- matching: Hungarian assignment of recovered to true texts maximising the sum of ROUGE-1 F.
- ROUGE-1/2/L: rouge-score F-measure of each matched pair, no stemming, with a Unicode-aware tokenizer
  (lower-cased words; each CJK character is a word), which on ASCII text equals rouge-score's default.
- token P/R/F1: multiset overlap of token ids of a matched pair, P = |r ∩ t|/|r|, R = |r ∩ t|/|t|.
- exact: share of true texts whose matched recovery has identical token ids.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"  # kana, CJK, hangul
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


class UnicodeTokenizer:
    """rouge-score tokenizer: lower-case, words of letters/digits, one token per CJK character."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


_SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer())


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    s = _SCORER.score(reference, prediction)
    return {"rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure, "rougeL": s["rougeL"].fmeasure}


def token_prf(predicted: Sequence[int], true: Sequence[int]) -> tuple[float, float, float]:
    """Multiset precision, recall and F1 of token ids."""
    if not predicted or not true:
        return 0.0, 0.0, 0.0
    common = sum((Counter(predicted) & Counter(true)).values())
    p, r = common / len(predicted), common / len(true)
    return p, r, (2 * p * r / (p + r) if common else 0.0)


def match_texts(predicted: Sequence[str], true: Sequence[str]) -> list[tuple[int, int]]:
    """One-to-one (pred_index, true_index) pairs maximising total ROUGE-1 F (Hungarian)."""
    if not predicted or not true:
        return []
    gain = np.array([[rouge_scores(p, t)["rouge1"] for t in true] for p in predicted])
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return sorted(zip(rows.tolist(), cols.tolist(), strict=True), key=lambda rc: rc[1])


@dataclass(frozen=True)
class PairScore:
    true_index: int
    pred_index: int | None
    true_text: str
    pred_text: str
    rouge1: float
    rouge2: float
    rougeL: float
    token_precision: float
    token_recall: float
    token_f1: float
    exact: bool

    def to_dict(self) -> dict:
        return asdict(self)


def score_bag(predicted: Sequence[int], true_ids: Sequence[Sequence[int]]) -> dict[str, float]:
    """A recovered bag of tokens against the batch's token multiset: multiset precision, recall and F1
    (:func:`token_prf`), and the share of the batch's distinct tokens that are in the bag."""
    truth = [t for ids in true_ids for t in ids]
    p, r, f = token_prf(predicted, truth)
    distinct = set(truth)
    return {
        "bag_precision": p,
        "bag_recall": r,
        "bag_f1": f,
        "bag_distinct_recall": len(distinct & set(predicted)) / len(distinct) if distinct else 0.0,
    }


@dataclass(frozen=True)
class BatchScore:
    pairs: list[PairScore]
    slots: int
    rouge1: float
    rouge2: float
    rougeL: float
    token_precision: float
    token_recall: float
    token_f1: float
    exact_rate: float

    def aggregate(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("pairs")
        return d


def score_batch(
    pred_texts: Sequence[str],
    true_texts: Sequence[str],
    pred_ids: Sequence[Sequence[int]] | None = None,
    true_ids: Sequence[Sequence[int]] | None = None,
) -> BatchScore:
    """Match then score; token metrics need ids for both sides (else they are computed on ROUGE words)."""
    if pred_ids is None or true_ids is None:
        tok = UnicodeTokenizer()
        pred_ids = [tok.tokenize(t) for t in pred_texts]  # type: ignore[misc]
        true_ids = [tok.tokenize(t) for t in true_texts]  # type: ignore[misc]
    matched = {t: p for p, t in match_texts(pred_texts, true_texts)}
    pairs: list[PairScore] = []
    for ti, ttext in enumerate(true_texts):
        pi = matched.get(ti)
        if pi is None:
            pairs.append(PairScore(ti, None, ttext, "", 0, 0, 0, 0, 0, 0, False))
            continue
        r = rouge_scores(pred_texts[pi], ttext)
        p, rc, f = token_prf(list(pred_ids[pi]), list(true_ids[ti]))
        pairs.append(
            PairScore(
                ti,
                pi,
                ttext,
                pred_texts[pi],
                r["rouge1"],
                r["rouge2"],
                r["rougeL"],
                p,
                rc,
                f,
                list(pred_ids[pi]) == list(true_ids[ti]),
            )
        )
    slots = max(len(true_texts), len(pred_texts), 1)

    def mean(key: str) -> float:
        return float(sum(getattr(x, key) for x in pairs) / slots)

    return BatchScore(
        pairs,
        slots,
        mean("rouge1"),
        mean("rouge2"),
        mean("rougeL"),
        mean("token_precision"),
        mean("token_recall"),
        mean("token_f1"),
        float(sum(x.exact for x in pairs) / max(len(true_texts), 1)),
    )
