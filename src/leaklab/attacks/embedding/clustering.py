"""Topic recovery from probes: the attacker sends many probe texts to a similarity search over hidden
documents, sees which ids come back with which scores, and clusters the hidden documents.

Each hidden document d is represented by the score-weighted mean of the probe vectors that retrieved it,
r_d = Σ_j w_jd φ(q_j) with w_jd = exp(s_jd / τ) over the probes j returning d; k-means on r_d gives topics,
named by the most frequent words of their strongest probes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from leaklab.attacks.base import CannotRun, NoSignal
from leaklab.attacks.embedding.access import Access, Prediction, PublicData, SearchEndpoint
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, at_least
from leaklab.core import Config, option
from leaklab.encoders import check_texts, check_vectors
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import words

_STOP = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "of",
        "to",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "was",
        "with",
        "as",
        "at",
        "by",
        "be",
        "this",
        "are",
        "from",
        "has",
        "have",
        "had",
        "but",
        "not",
        "its",
        "his",
        "her",
        "their",
        "they",
        "he",
        "she",
        "we",
        "you",
        "i",
        "s",
        "said",
        "will",
        "would",
        "been",
        "which",
        "who",
        "or",
        "were",
    ]
)


@dataclass
class Clusters:
    doc_ids: list[str]
    labels: np.ndarray
    representations: np.ndarray
    keywords: dict[int, list[str]]


class ProbeClustering:
    """Cluster hidden documents by the probes that retrieve them."""

    name = "clustering"

    def __init__(
        self,
        probe_texts: list[str],
        probe_vectors: np.ndarray,
        clusters: int = 5,
        top_k: int = 10,
        temperature: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.probes = check_texts(probe_texts, "probe texts")
        if len(self.probes) != len(probe_texts):
            raise LeaklabError("probe texts contain empty entries")
        self.vectors = check_vectors(probe_vectors, np.shape(probe_vectors)[-1], "probe vectors")
        if len(self.vectors) != len(self.probes):
            raise LeaklabError(f"{len(self.probes)} probes but {len(self.vectors)} probe vectors")
        if clusters < 1:
            raise LeaklabError(f"clusters must be >= 1, got {clusters}")
        self.k, self.top_k, self.tau, self.seed = clusters, top_k, temperature, seed

    def run(self, kb: SearchEndpoint) -> Clusters:
        hits = kb.hits(self.probes, self.top_k)
        by_doc: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for j, row in enumerate(hits):
            for doc_id, score in row:
                by_doc[doc_id].append((j, score))
        if not by_doc:
            raise NoSignal("the probes retrieved no document")
        if len(by_doc) < self.k:
            raise LeaklabError(f"the probes retrieved {len(by_doc)} documents, fewer than {self.k} clusters")
        ids = sorted(by_doc)
        reps = np.stack([self._represent(by_doc[d]) for d in ids])
        from sklearn.cluster import KMeans

        labels = KMeans(self.k, n_init=10, random_state=self.seed).fit_predict(reps)
        keywords = {
            c: self._keywords([by_doc[d] for d, lab in zip(ids, labels, strict=True) if lab == c])
            for c in range(self.k)
        }
        return Clusters(ids, labels, reps, keywords)

    def _represent(self, hits: list[tuple[int, float]]) -> np.ndarray:
        idx = np.array([j for j, _ in hits])
        s = np.array([x for _, x in hits])
        w = np.exp((s - s.max()) / self.tau)
        r = (w[:, None] * self.vectors[idx]).sum(0)
        return r / max(np.linalg.norm(r), 1e-12)

    def _keywords(self, groups: list[list[tuple[int, float]]], n: int = 8) -> list[str]:
        counts: Counter[str] = Counter()
        for hits in groups:
            for j, _ in sorted(hits, key=lambda h: -h[1])[:3]:
                counts.update(w for w in set(words(self.probes[j])) if w not in _STOP and len(w) > 2)
        return [w for w, _ in counts.most_common(n)]


@dataclass(frozen=True)
class ClusteringConfig(Config):
    """Options of the probe-clustering attack."""

    kb_corpus: str = option("bbc-news:paragraphs", "labelled corpus of the hidden documents (and the probes)")
    kb_max_tokens: int = option(64, "longest hidden document and probe, in tokens")
    probes: int = option(400, "public probe texts sent to the search (at least 1)")
    clusters: int | None = option(None, "k of k-means (default: the corpus's number of topics)")
    top_k: int = option(10, "results returned per probe (at least 1)")

    def __post_init__(self) -> None:
        at_least(self, 1, "probes", "top_k")


ACCESS = "search endpoint only + probe vectors from the embedding API"


@EMBED_ATTACKS.register("clustering", config=ClusteringConfig, access=ACCESS, case="clustering")
def attack(access: Access, public: PublicData, cfg: ClusteringConfig) -> Prediction:
    """Cluster hidden documents by the probe queries that retrieve them."""
    search, enc = access.need("search"), access.need("encoder")
    k = cfg.clusters if cfg.clusters is not None else access.hints.get("topics")
    if k is None:
        raise CannotRun("needs option clusters: the number of topics is not granted")
    probes = public.texts(limit=cfg.probes)
    res = ProbeClustering(probes, enc.embed(probes), clusters=k, top_k=cfg.top_k, seed=public.seed).run(search)
    return Prediction(
        ids=res.doc_ids,
        labels=res.labels,
        vectors={"representations": res.representations},
        measures={"clusters": k, "keywords": {str(c): kw for c, kw in res.keywords.items()}},
        notes={"access": "query texts -> top-k ids and scores; probes from the public split"},
    )
