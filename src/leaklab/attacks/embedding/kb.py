"""Knowledge-base extraction through similarity queries.

The victim indexes hidden documents; the attacker may only submit query texts and read back the top-k
(id, score) pairs through a :class:`~leaklab.attacks.embedding.access.SearchEndpoint` over the index — locally
:class:`HiddenKB`, remotely :class:`HttpKB` (``POST
/v1/search`` with ``{"query": str | [str], "top_k": k}`` answered by ``{"data": [{"results": [{"id", "score"}]}]}``).

Attack (:class:`KBExtractor`), an adaptive probe search that grows text where scores rise:

1. discovery: every vocabulary word is a probe; each answer gives s(w, d) for the docs d it returns.
2. per discovered doc d, words are ranked by their specificity to d, s(w, d) − mean of w's returned scores.
   The text x starts as the most specific words; pruning drops a word when s(x − w, d) > s(x, d) (a synonym
   is redundant once the true word is in); growth appends the other candidates (then frequent function
   words) one at a time, keeping a word when s(x + w, d) rises; a last pruning pass follows.
3. all documents advance in lock-step, one batched search per step.

With the flag ``encoder_known`` (the attacker also holds the index's encoder, :class:`KBVectorRecovery`):
every returned score is s(q, d) = ⟨e(q), d̂⟩ with e(q) computable locally, so ≥ dim returned scores of a
document pin its unit vector d̂ by least squares. Probes are public texts, then adaptive perturbations of the
queries that scored highest for a document (they keep it in the top-k answers); d̂ is then inverted offline
by the white-box inverter with no further query.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leaklab.attacks.base import NoSignal
from leaklab.attacks.embedding.access import Access, Hit, Prediction, PublicData, SearchEndpoint
from leaklab.attacks.embedding.bow import BowTraining
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, at_least, sub_config
from leaklab.attacks.embedding.whitebox import WhiteBoxSearch, make_whitebox, search_start
from leaklab.core import option
from leaklab.encoders import Encoder, LocalEncoder, check_texts
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import words


class HiddenKB:
    """A similarity search over hidden documents (the victim side): cosine of query and document vectors."""

    def __init__(
        self, docs: Sequence[str], encoder: Encoder, ids: Sequence[str] | None = None, max_top_k: int = 100
    ) -> None:
        self._docs = check_texts(docs, "knowledge base")
        if len(self._docs) != len(docs):
            raise LeaklabError("knowledge base holds empty documents")
        self.ids = list(ids) if ids is not None else [f"doc-{i}" for i in range(len(docs))]
        if len(set(self.ids)) != len(self.ids) or len(self.ids) != len(self._docs):
            raise LeaklabError("knowledge-base ids must be unique, one per document")
        self.encoder = encoder
        vecs = encoder.embed(self._docs)
        self._matrix = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
        self.max_top_k = max_top_k
        self.queries = 0
        self.calls = 0

    def __len__(self) -> int:
        return len(self._docs)

    def similarities(self, query_texts: Sequence[str]) -> np.ndarray:
        """Cosine of each query with every document (one counted call of ``len(query_texts)`` queries)."""
        texts = list(query_texts)
        self.queries += len(texts)
        self.calls += 1
        q = self.encoder.embed(texts)
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        return q @ self._matrix.T

    @property
    def matrix(self) -> np.ndarray:
        """The unit document vectors (victim side: for scoring only)."""
        return self._matrix

    def search(self, query_texts: str | Sequence[str], k: int) -> list[list[Hit]]:
        texts = [query_texts] if isinstance(query_texts, str) else list(query_texts)
        if not 1 <= k <= self.max_top_k:
            raise LeaklabError(f"top_k must be in 1..{self.max_top_k}, got {k}")
        if not texts:
            return []
        return self.search_vectors(self.encoder.embed(texts), k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k (id, cosine) per query vector."""
        if not 1 <= k <= self.max_top_k:
            raise LeaklabError(f"top_k must be in 1..{self.max_top_k}, got {k}")
        self.queries += len(vectors)
        self.calls += 1
        q = np.asarray(vectors, dtype=np.float32)
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        sims = q @ self._matrix.T
        k = min(k, sims.shape[1])
        top = np.argsort(-sims, axis=1)[:, :k]
        return [[(self.ids[j], float(sims[i, j])) for j in row] for i, row in enumerate(top)]

    def text_of(self, doc_id: str) -> str:
        """Ground truth for scoring only."""
        return self._docs[self.ids.index(doc_id)]


class HttpKB:
    """Client of a remote similarity search: POST {base}/v1/search, Bearer key; same API as HiddenKB."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        client: Any = None,
        batch_size: int = 64,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1/search"):
            self.url += "/v1/search"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout, headers=headers)
        if client is not None and api_key:
            self._client.headers.update(headers)
        self._batch = batch_size
        self.queries = 0
        self.calls = 0

    @staticmethod
    def request_body(texts: list[str], k: int) -> dict[str, Any]:
        return {"query": texts, "top_k": k}

    @staticmethod
    def parse_response(body: dict[str, Any], n: int) -> list[list[Hit]]:
        rows = body.get("data")
        if not isinstance(rows, list) or len(rows) != n:
            raise LeaklabError(
                f"search endpoint answered {len(rows) if isinstance(rows, list) else 'no'} result lists for {n} queries"
            )
        return [[(str(h["id"]), float(h["score"])) for h in row.get("results", [])] for row in rows]

    def search(self, query_texts: str | Sequence[str], k: int) -> list[list[Hit]]:
        import httpx

        texts = [query_texts] if isinstance(query_texts, str) else list(query_texts)
        out: list[list[Hit]] = []
        for i in range(0, len(texts), self._batch):
            part = texts[i : i + self._batch]
            try:
                resp = self._client.post(self.url, json=self.request_body(part, k))
            except httpx.HTTPError as exc:
                raise LeaklabError(f"search endpoint {self.url} unreachable: {exc}") from None
            if resp.status_code != 200:
                raise LeaklabError(f"search endpoint {self.url} answered {resp.status_code}: {resp.text[:200]}")
            out.extend(self.parse_response(resp.json(), len(part)))
            self.queries += len(part)
            self.calls += 1
        return out


@dataclass
class Extraction:
    texts: dict[str, str]
    queries_per_doc: dict[str, int]
    discovery_queries: int
    info: dict[str, Any] = field(default_factory=dict)


class KBExtractor:
    """Adaptive probe search that grows each document's text where its score rises."""

    name = "kb-extract"

    def __init__(
        self,
        vocab: Sequence[str],
        function_words: Sequence[str] = (),
        top_k: int = 10,
        candidates: int = 60,
        min_gain: float = 1e-3,
        max_words: int = 40,
        batch: int = 256,
        start_words: int = 1,
    ) -> None:
        self.vocab = list(dict.fromkeys(w for w in vocab if w.strip()))
        if not self.vocab:
            raise LeaklabError("the probe vocabulary is empty")
        self.function_words = [w for w in function_words if w.strip()]
        self.top_k, self.candidates, self.min_gain = top_k, candidates, min_gain
        self.max_words, self.batch, self.start_words = max_words, batch, max(1, start_words)

    def discover(self, kb: SearchEndpoint) -> dict[str, dict[str, float]]:
        """Specificity of every probe word w to every doc d returned for it: s(w, d) − mean_d' s(w, d')."""
        seen: dict[str, dict[str, float]] = defaultdict(dict)
        for i in range(0, len(self.vocab), self.batch):
            part = self.vocab[i : i + self.batch]
            for w, hits in zip(part, kb.hits(part, self.top_k), strict=True):
                mean = float(np.mean([s for _, s in hits])) if hits else 0.0
                for doc_id, score in hits:
                    seen[doc_id][w] = score - mean
        return seen

    def _start(self, word_scores: dict[str, float]) -> _Growth:
        ranked = sorted(word_scores, key=lambda w: -word_scores[w])[: self.candidates]
        head = ranked[: self.start_words]
        pool = ranked[self.start_words :] + [w for w in self.function_words if w not in ranked] + head[:10]
        return _Growth(pool=pool, words=head)

    def run(self, kb: SearchEndpoint) -> Extraction:
        """Discovery, then growth and pruning of all discovered documents in lock-step batches."""
        start = kb.queries
        seen = self.discover(kb)
        discovery = kb.queries - start
        states = {d: self._start(scores) for d, scores in seen.items()}
        while True:
            asks = []
            for d, st in states.items():
                proposal = [] if st.done else st.proposal(self.max_words)
                if not st.done:
                    asks.append((d, proposal))
            if not asks:
                break
            for i in range(0, len(asks), self.batch):
                part = asks[i : i + self.batch]
                answers = kb.hits([" ".join(ws) for _, ws in part], self.top_k)
                for (d, ws), hits in zip(part, answers, strict=True):
                    states[d].update(ws, dict(hits).get(d, -1.0), self.min_gain)
        return Extraction(
            {d: " ".join(st.words) for d, st in states.items()},
            {d: st.spent for d, st in states.items()},
            discovery,
            {"discovered": len(seen)},
        )


@dataclass
class _Growth:
    """Per-document state of the probe search. Phases: score the start text (the ``start`` most specific
    words), prune (drop a word when the score rises), grow through ``pool`` (append a word when the score
    rises), prune again."""

    pool: list[str]
    words: list[str]
    best: float = -1.0
    phase: int = 0
    ptr: int = 0
    spent: int = 0
    done: bool = False

    def proposal(self, max_words: int) -> list[str]:
        while True:
            if self.phase == 0:
                return list(self.words)
            if self.phase in (1, 3):
                if self.ptr < len(self.words) and len(self.words) > 1:
                    return self.words[: self.ptr] + self.words[self.ptr + 1 :]
            elif self.ptr < len(self.pool) and len(self.words) < max_words:
                return [*self.words, self.pool[self.ptr]]
            self.phase, self.ptr = self.phase + 1, 0
            if self.phase > 3:
                self.done = True
                return list(self.words)

    def update(self, proposal: list[str], score: float, min_gain: float) -> None:
        self.spent += 1
        if self.phase == 0:
            self.best, self.phase = score, 1
            return
        if score > self.best + min_gain:
            self.words, self.best = proposal, score
            if self.phase == 2:
                self.ptr += 1
        else:
            self.ptr += 1


@dataclass
class VectorRecovery:
    """Recovered document vectors, the returned scores each rests on, and the least-squares residuals."""

    vectors: dict[str, np.ndarray]
    observations: dict[str, int]
    residual: dict[str, float]
    discovery_queries: int
    adaptive_queries: int


class KBVectorRecovery:
    """Least-squares recovery of hidden document vectors from similarity scores (encoder known)."""

    name = "kb-vectors"

    def __init__(
        self,
        encoder: Encoder,
        probe_texts: Sequence[str],
        vocab: Sequence[str],
        top_k: int = 20,
        min_obs: int | None = None,
        per_round: int = 32,
        max_rounds: int = 40,
        batch: int = 256,
        seed: int = 0,
    ) -> None:
        self.encoder = encoder
        self.probes = list(dict.fromkeys(t for t in probe_texts if t.strip()))
        self.vocab = [w for w in vocab if w.strip()]
        if not self.probes or not self.vocab:
            raise LeaklabError("vector recovery needs probe texts and a probe vocabulary")
        self.top_k, self.per_round, self.max_rounds, self.batch = top_k, per_round, max_rounds, batch
        self.min_obs = min_obs or encoder.dim + 16
        self.rng = np.random.default_rng(seed)
        self._vecs: dict[str, np.ndarray] = {}
        self._rows: dict[str, list[tuple[str, float]]] = defaultdict(list)

    def _ask(self, kb: SearchEndpoint, texts: list[str]) -> None:
        """Submit ``texts`` and record every returned (doc, query, score)."""
        texts = [t for t in dict.fromkeys(texts) if t not in self._vecs]
        for i in range(0, len(texts), self.batch):
            part = texts[i : i + self.batch]
            vecs = self.encoder.embed(part)
            vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
            self._vecs.update(zip(part, vecs, strict=True))
            for q, hits in zip(part, kb.hits(part, self.top_k), strict=True):
                for doc_id, score in hits:
                    self._rows[doc_id].append((q, score))

    def _perturb(self, text: str) -> str:
        """One random edit of a query: replace, insert or delete a word (a new direction near the same doc)."""
        ws = text.split()
        op, w = self.rng.integers(3), str(self.vocab[self.rng.integers(len(self.vocab))])
        i = int(self.rng.integers(len(ws) + 1))
        if op == 0 and ws:
            ws[min(i, len(ws) - 1)] = w
        elif op == 1 or len(ws) < 3:
            ws.insert(i, w)
        else:
            del ws[min(i, len(ws) - 1)]
        return " ".join(ws)

    def _adaptive(self, doc_id: str) -> list[str]:
        """Perturbations of the queries that scored highest for ``doc_id``."""
        best = [q for q, _ in sorted(self._rows[doc_id], key=lambda qs: -qs[1])[:4]]
        return [self._perturb(best[j % len(best)]) for j in range(self.per_round)]

    def solve(self, doc_id: str, mu: np.ndarray, ridge: float = 1e-8) -> tuple[np.ndarray, float]:
        """d̂ = μ + (QᵀQ + λI)⁻¹ Qᵀ(s − Qμ) (Q: unit vectors of the queries that returned the doc, s: their
        scores, μ: mean probe vector as the prior of undetermined directions), then normalised."""
        rows = self._rows[doc_id]
        q = np.stack([self._vecs[t] for t, _ in rows]).astype(np.float64)
        s = np.array([sc for _, sc in rows], dtype=np.float64)
        a = q.T @ q + ridge * np.eye(q.shape[1])
        d = mu + np.linalg.solve(a, q.T @ (s - q @ mu))
        resid = float(np.sqrt(np.mean((q @ d - s) ** 2)))
        return (d / max(np.linalg.norm(d), 1e-12)).astype(np.float32), resid

    def run(self, kb: SearchEndpoint) -> VectorRecovery:
        start = kb.queries
        self._ask(kb, self.probes)
        discovery = kb.queries - start
        for _ in range(self.max_rounds):
            short = [d for d in self._rows if len({q for q, _ in self._rows[d]}) < self.min_obs]
            if not short:
                break
            self._ask(kb, [q for d in short for q in self._adaptive(d)])
        vectors, residual = {}, {}
        mu = np.mean(np.stack(list(self._vecs.values())), axis=0).astype(np.float64)
        for d in self._rows:
            vectors[d], residual[d] = self.solve(d, mu)
        return VectorRecovery(
            vectors,
            {d: len(r) for d, r in self._rows.items()},
            residual,
            discovery,
            kb.queries - start - discovery,
        )


def probe_vocab(texts: Sequence[str], size: int) -> tuple[list[str], list[str]]:
    """The attacker's probe words (``size`` most frequent public words) and its 40 most frequent words."""
    counts = Counter(w for t in texts for w in words(t))
    ranked = [w for w, _ in counts.most_common()]
    return ranked[:size], ranked[:40]


@dataclass(frozen=True)
class KbExtractConfig(BowTraining, WhiteBoxSearch):
    """Options of knowledge-base extraction; with ``encoder_known``, the white-box search (and the bag-of-words
    inverter of its start) that inverts the recovered vectors, whose vocabulary and candidates are ``wb_*``."""

    vocab: int = option(10000, "probe words: the most frequent public-split words")
    candidates: int = option(60, "most specific words per document that the growth tries")
    start_words: int = option(1, "most specific words of the starting text")
    top_k: int = option(20, "results asked per query (at least 1)")
    max_top_k: int = option(100, "most results the victim's search returns per query")
    recovered_f1: float = option(0.8, "token F1 at which a document counts as recovered")
    encoder_known: bool = option(False, "the attacker holds the index's encoder: recover vectors, then invert them")
    probes: int = option(2000, "encoder_known: public probe texts of the vector recovery (at least 1)")
    per_round: int = option(32, "encoder_known: adaptive probes per under-observed document and round")
    rounds: int = option(40, "encoder_known: most adaptive rounds")
    wb_vocab: int = option(8000, "encoder_known: vocab of the white-box search and of its bag-of-words start")
    wb_candidates: int = option(24, "encoder_known: candidates of the white-box search")

    def __post_init__(self) -> None:
        at_least(self, 1, "top_k", "probes")

    def search(self) -> WhiteBoxSearch:
        """The white-box search's options (its vocab and candidates are ``wb_vocab`` and ``wb_candidates``)."""
        return sub_config(WhiteBoxSearch, self, vocab=self.wb_vocab, candidates=self.wb_candidates)

    def bow(self) -> BowTraining:
        """The options of the search start's bag-of-words inverter (its vocab is ``wb_vocab``)."""
        return sub_config(BowTraining, self, vocab=self.wb_vocab)


ACCESS = "search endpoint only: query texts -> top-k (id, score); option encoder_known adds the index's encoder"


@EMBED_ATTACKS.register("kb-extract", config=KbExtractConfig, access=ACCESS, case="kb-extract")
def attack(access: Access, public: PublicData, cfg: KbExtractConfig) -> Prediction:
    """Reconstruct hidden knowledge-base documents from similarity scores."""
    search = access.need("search")
    texts = public.texts()
    vocab, function_words = probe_vocab(texts, cfg.vocab)
    if cfg.encoder_known:
        pred_of, measures, vectors, info = _extract_known(access.need("weights").encoder, search, public, cfg, vocab)
    else:
        attack = KBExtractor(
            vocab, function_words, top_k=cfg.top_k, candidates=cfg.candidates, start_words=cfg.start_words
        )
        res = attack.run(search)
        pred_of, vectors, info = res.texts, {}, {}
        measures = {
            "discovery_queries": res.discovery_queries,
            "growth_queries_per_doc": float(np.mean(list(res.queries_per_doc.values()) or [0])),
        }
    if not pred_of:
        raise NoSignal("the probes discovered no hidden document")
    return Prediction(
        texts=list(pred_of.values()),
        ids=list(pred_of),
        vectors=vectors,
        measures=measures,
        notes={
            "access": "query texts -> top-k ids and scores",
            "encoder_known": cfg.encoder_known,
            "top_k": cfg.top_k,
            "probe_vocab": f"{len(vocab)} most frequent public-split words",
        },
        info=info,
    )


def natural_order(ids: Sequence[str]) -> list[str]:
    """Document ids in natural order (``doc-2`` before ``doc-10``)."""
    return sorted(ids, key=lambda d: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", d)])


def _extract_known(
    local: LocalEncoder, kb: SearchEndpoint, public: PublicData, cfg: KbExtractConfig, vocab: list[str]
) -> tuple[dict[str, str], dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """Encoder known: least-squares document vectors from scores, then offline white-box inversion of each."""
    import time

    rec = KBVectorRecovery(
        local,
        public.texts()[: cfg.probes],
        vocab,
        top_k=cfg.top_k,
        per_round=cfg.per_round,
        max_rounds=cfg.rounds,
        seed=public.seed,
    ).run(kb)
    ids = natural_order(rec.vectors)
    vecs = np.stack([rec.vectors[d] for d in ids]) if ids else np.zeros((0, local.dim), np.float32)
    start = time.perf_counter()
    inv = make_whitebox(public, local, cfg.search())
    starts, pools = search_start(public, local, vecs, cfg.search(), cfg.bow()) if ids else (None, None)
    texts, _ = inv.invert(vecs, starts, pools) if ids else ([], [])
    measures = {
        "discovery_queries": rec.discovery_queries,
        "adaptive_queries": rec.adaptive_queries,
        "observations_per_doc": float(np.mean(list(rec.observations.values()) or [0])),
        "inversion_seconds": round(time.perf_counter() - start, 1),
    }
    return dict(zip(ids, texts, strict=True)), measures, dict(zip(ids, vecs, strict=True)), {}
