"""Streaming probe detector: per-key session features over a sliding window, combined into a score.

Features (each the share of recent queries showing it, so every one lies in [0, 1]):
near-duplicate (cosine >= 0.9 to an earlier query with other text), edit chain (prefix growth/shrink or a
single-word edit of an earlier query), convergence (cosine >= 0.8 to the previous query: an inversion loop
homing in on a fixed point), sweep (queries of <= 2 words: token sweeps), unnatural text (no function words or
mostly sub-word pieces), and the query rate (per minute, against ``RATE_SCALE``).

The probe cluster catches loops padded with natural text: queries linked by an edit step or near-duplication
(texts of >= 5 words) form clusters; a cluster larger than ``CLUSTER_FREE`` queries is evidence on its own,
however many unrelated queries surround it, so the score is the larger of the weighted mean and that feature.
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
CLUSTER_FREE = 7  # linked queries in one cluster that count as nothing (retries, typo fixes, follow-ups)
CLUSTER_SPAN = 5  # linked queries beyond CLUSTER_FREE that make the cluster feature 1.0
CLUSTER_MIN_WORDS = 5
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
    seq: int
    ts: float
    words: tuple[str, ...]
    vec: np.ndarray
    flags: dict[str, bool]
    links: tuple[int, ...]  # seq numbers of the earlier queries this one is an edit or near-duplicate of


def largest_cluster(entries: list[Entry]) -> int:
    """Size of the largest connected group of entries under their links (union-find over the window)."""
    parent = {e.seq: e.seq for e in entries}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in entries:
        for other in e.links:
            if other in parent:
                parent[root(e.seq)] = root(other)
    sizes: dict[int, int] = {}
    for e in entries:
        r = root(e.seq)
        sizes[r] = sizes.get(r, 0) + 1
    return max(sizes.values(), default=0)


def cluster_feature(size: int) -> float:
    return min(1.0, max(0, size - CLUSTER_FREE) / CLUSTER_SPAN)


@dataclass
class Session:
    window: int
    entries: deque = field(default_factory=deque)
    count: int = 0
    last_flag_at: int = 0
    flagged: bool = False
    score: float = 0.0
    action: str | None = None  # the mitigation in force since the key was flagged

    def observe(self, text: str, vec: np.ndarray, ts: float, vocab: frozenset[str] | None) -> dict[str, float]:
        """Add one query; return the feature means over the window and the probe-cluster feature."""
        ws = words(text)
        prev = list(self.entries)
        f = {k: False for k in FEATURES if k != "rate"}
        links: list[int] = []
        if prev:
            mat = np.stack([e.vec for e in prev])
            sims = mat @ vec
            dup = [bool(s >= 0.9 and e.words != ws) for s, e in zip(sims, prev, strict=True)]
            edit = [prefix_step(e.words, ws) or one_edit(e.words, ws) for e in prev]
            f["near_duplicate"] = any(dup)
            f["convergence"] = bool(sims[-1] >= 0.8)
            f["edit_chain"] = any(edit)
            if len(ws) >= CLUSTER_MIN_WORDS:
                links = [
                    e.seq
                    for e, d, ed in zip(prev, dup, edit, strict=True)
                    if (d or ed) and len(e.words) >= CLUSTER_MIN_WORDS
                ]
        f["sweep"] = 0 < len(ws) <= 2
        f["unnatural"] = unnatural(ws, vocab)
        self.entries.append(Entry(self.count, ts, ws, vec, f, tuple(links)))
        if len(self.entries) > self.window:
            self.entries.popleft()
        self.count += 1
        n = len(self.entries)
        out = {k: sum(e.flags[k] for e in self.entries) / n for k in f}
        span = self.entries[-1].ts - self.entries[0].ts
        out["rate"] = min(1.0, (n - 1) / max(span, 1e-3) * 60.0 / RATE_SCALE) if n > 1 else 0.0
        out["probe_cluster"] = cluster_feature(largest_cluster(list(self.entries)))
        return out


def score(features: dict[str, float]) -> float:
    """The larger of the weighted mean of the share features (weights sum to 1) and the probe-cluster
    feature: a number in [0, 1]."""
    total = sum(WEIGHTS.values())
    mean = float(sum(WEIGHTS[k] * features.get(k, 0.0) for k in WEIGHTS) / total)
    return max(mean, float(features.get("probe_cluster", 0.0)))


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

    def observe(
        self, key_id: str, texts: list[str], vecs: np.ndarray, ts: float | None = None, action: str | None = None
    ) -> Verdict:
        """Add a request's queries; ``action`` is the mitigation recorded when this call flags the key."""
        ts = time.time() if ts is None else ts
        with self._lock:
            s = self.sessions.setdefault(key_id, Session(self.window))
            feats: dict[str, float] = {}
            for text, vec in zip(texts, vecs, strict=True):
                feats = s.observe(text, vec, ts, self.vocab)
            sc = score(feats)
            s.score = sc
            hot = s.count >= self.min_queries and sc >= self.threshold
            new = hot and (not s.flagged or s.count - s.last_flag_at >= self.reflag_every)
            if new:
                s.last_flag_at = s.count
            if hot and not s.flagged:
                s.action = action
            s.flagged = s.flagged or hot
            return Verdict(sc, feats, s.flagged, new)

    def is_flagged(self, key_id: str) -> bool:
        s = self.sessions.get(key_id)
        return bool(s and s.flagged)

    def mitigation(self, key_id: str) -> str | None:
        """The action in force for a flagged key (None while it is not flagged)."""
        s = self.sessions.get(key_id)
        return s.action if s and s.flagged else None

    def state(self, key_id: str) -> MonitorState:
        with self._lock:
            s = self.sessions[key_id]
            return MonitorState(key_id, s.count, s.score, s.flagged, s.last_flag_at, s.action)

    def restore(self, states: list[MonitorState]) -> None:
        """Sessions from persisted state (the query window itself starts empty: vectors are not stored)."""
        with self._lock:
            for st in states:
                s = self.sessions.setdefault(st.key_id, Session(self.window))
                s.count, s.score, s.flagged = st.count, st.score, st.flagged
                s.last_flag_at, s.action = st.last_flag_at, st.action


@dataclass(frozen=True)
class MonitorState:
    """What survives a restart, per key: queries seen, last score, flag and the mitigation in force."""

    key_id: str
    count: int
    score: float
    flagged: bool
    last_flag_at: int
    action: str | None
