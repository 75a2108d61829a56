"""Streaming probe detector: per-key session features over a sliding window, combined into a score.

Features (each the share of recent queries showing it, so every one lies in [0, 1]):
near-duplicate (cosine >= 0.9 to an earlier query with other text), edit chain (prefix growth/shrink or a
single-word edit of an earlier query), convergence (cosine >= 0.8 to the previous query: an inversion loop
homing in on a fixed point), sweep (queries of <= 2 words: token sweeps), unnatural text (no function words or
mostly sub-word pieces), and the query rate (per minute, against ``RATE_SCALE``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

WEIGHTS = {
    "near_duplicate": 0.25,
    "edit_chain": 0.3,
    "convergence": 0.2,
    "sweep": 0.1,
    "unnatural": 0.15,
    "rate": 0.0,
}
FEATURES = tuple(WEIGHTS)
RATE_SCALE = 600.0  # queries per minute that count as rate feature 1.0 (reported; weight 0 by default)
_STOP = (
    "a an the and or but of to in on at for with by from as is are was were be been it its this that "
    "these those i you he she we they me him her us them my your our their not no do does did have has had "
    "will would can "
    "could should so if then than there here what which who how when where why all just very"
)
STOPWORDS = frozenset(_STOP.split(" "))


def words(text: str) -> tuple[str, ...]:
    return tuple(w.strip(".,!?;:'\"()[]").lower() for w in text.split() if w.strip(".,!?;:'\"()[]"))


def one_edit(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when word sequences a and b differ by exactly one substitution, insertion or deletion."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return short[i:] == long_[i + 1 :]


def prefix_step(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when one sequence extends the other by 1..3 words (prefix growth of a token-by-token search)."""
    if not a or not b or a == b:
        return False
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return 0 < len(long_) - len(short) <= 3 and long_[: len(short)] == short


def unnatural(ws: tuple[str, ...], vocab: frozenset[str] | None) -> bool:
    """No function word in >= 4 words, or more than half the words outside the vocabulary."""
    if len(ws) >= 4 and not any(w in STOPWORDS for w in ws):
        return True
    if vocab is not None and ws:
        return sum(w not in vocab for w in ws) > len(ws) / 2
    return False


@dataclass
class Entry:
    ts: float
    words: tuple[str, ...]
    vec: np.ndarray
    flags: dict[str, bool]


@dataclass
class Session:
    window: int
    entries: deque = field(default_factory=deque)
    count: int = 0
    last_flag_at: int = 0
    flagged: bool = False

    def observe(self, text: str, vec: np.ndarray, ts: float, vocab: frozenset[str] | None) -> dict[str, float]:
        """Add one query; return the feature means over the window."""
        ws = words(text)
        prev = list(self.entries)
        f = {k: False for k in FEATURES if k != "rate"}
        if prev:
            mat = np.stack([e.vec for e in prev])
            sims = mat @ vec
            f["near_duplicate"] = bool(any(s >= 0.9 and e.words != ws for s, e in zip(sims, prev, strict=True)))
            f["convergence"] = bool(sims[-1] >= 0.8)
            f["edit_chain"] = any(prefix_step(e.words, ws) or one_edit(e.words, ws) for e in prev)
        f["sweep"] = 0 < len(ws) <= 2
        f["unnatural"] = unnatural(ws, vocab)
        self.entries.append(Entry(ts, ws, vec, f))
        if len(self.entries) > self.window:
            self.entries.popleft()
        self.count += 1
        n = len(self.entries)
        out = {k: sum(e.flags[k] for e in self.entries) / n for k in f}
        span = self.entries[-1].ts - self.entries[0].ts
        out["rate"] = min(1.0, (n - 1) / max(span, 1e-3) * 60.0 / RATE_SCALE) if n > 1 else 0.0
        return out


def score(features: dict[str, float]) -> float:
    """Weighted mean of the features (weights sum to 1): a number in [0, 1]."""
    total = sum(WEIGHTS.values())
    return float(sum(WEIGHTS[k] * features.get(k, 0.0) for k in WEIGHTS) / total)


@dataclass(frozen=True)
class Verdict:
    score: float
    features: dict[str, float]
    flagged: bool
    new_flag: bool


class Monitor:
    """Sessions per key; ``observe`` returns the running score and whether it crossed the threshold."""

    def __init__(
        self,
        window: int = 64,
        min_queries: int = 16,
        threshold: float = 0.5,
        vocab: frozenset[str] | None = None,
        reflag_every: int = 500,
    ) -> None:
        self.window, self.min_queries, self.threshold = window, min_queries, threshold
        self.vocab = vocab
        self.reflag_every = reflag_every
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def observe(self, key_id: str, texts: list[str], vecs: np.ndarray, ts: float | None = None) -> Verdict:
        ts = time.time() if ts is None else ts
        with self._lock:
            s = self.sessions.setdefault(key_id, Session(self.window))
            feats: dict[str, float] = {}
            for text, vec in zip(texts, vecs, strict=True):
                feats = s.observe(text, vec, ts, self.vocab)
            sc = score(feats)
            hot = s.count >= self.min_queries and sc >= self.threshold
            new = hot and (not s.flagged or s.count - s.last_flag_at >= self.reflag_every)
            if new:
                s.last_flag_at = s.count
            s.flagged = s.flagged or hot
            return Verdict(sc, feats, s.flagged, new)

    def is_flagged(self, key_id: str) -> bool:
        s = self.sessions.get(key_id)
        return bool(s and s.flagged)
