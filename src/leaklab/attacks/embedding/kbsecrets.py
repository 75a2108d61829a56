"""Template-guided extraction of planted secrets from a knowledge base through similarity queries.

The attacker knows what a secret record looks like (a template such as "The PIN of account {name} is
{digits:4}.") and a candidate list per slot (public name lists, all digit strings); it may only send query
texts to a search endpoint and read back top-k ids, with scores where the API returns them. The attack
(:class:`KBSecretsAttack`):

1. locate: the template with blank slots (and a few random fills) returns the records that match it;
2. shared slot pass: per slot, one query per candidate with the other slots blank — every answer ranks all
   located records at once, so its cost is shared by them; a digits slot longer than ``digit_chunk`` is
   searched in chunks of that many positions (the other positions zero): 10^chunk queries per chunk, not 10^L;
   per record and slot the signal is the returned score; where the API returns ids only, the candidate is
   sent alone (the record holding it rises to the top) and the signal is −rank;
   the template's records are the documents above the largest gap in the mean signal over these queries;
3. per-record beam: the product of each slot's ``beam`` best candidates, best-first by summed rank, each
   sent as the fully filled template; a returned score >= ``exact_score`` (the record itself) stops the
   record's search, else the best-signal combination is kept (ids only: a full fill ranks its record first
   whether or not it is right, so each slot takes its best-ranked candidate and no query is sent);
4. digits position by position (scores only): each position's other 9 digits with the rest fixed, then each
   adjacent pair of positions (99 edits), up to ``sweeps`` rounds, for the records not yet returned at
   ``exact_score`` whose score is at least ``refine_above``.

Every request counts: the endpoint adapters count each query text and each request, and the attack's query
budget is read from them. Noise is detected by sending the locate query twice (scores differ), quantisation
by few distinct score values; either turns the early stop off.

Access: :class:`SearchAccess` — ``search(text_or_vector, k) -> (ids, scores | None)`` and a query counter —
with adapters for the local :class:`~leaklab.attacks.embedding.kb.HiddenKB` (:class:`LocalSearch`), a live
``leaklab serve`` ``/v1/search`` endpoint (:class:`HttpSearch`), and recovered document vectors searched
offline with the encoder known (:class:`VectorSearch`: zero further endpoint queries).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from leaklab.attacks.embedding.access import Access, Prediction, PublicData
from leaklab.attacks.embedding.kb import HiddenKB
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, Scenario, at_least
from leaklab.core import Config, option
from leaklab.encoders import Encoder
from leaklab.errors import LeaklabError
from leaklab.service.search_scores import ScoreView
from leaklab.threat.kbsecrets import PlantedKB, Slot, Template, candidates_of, plant_secrets, template_of

Answer = tuple[list[str], list[float] | None]
SIGNALS = ("auto", "scores", "ranks")


class SearchAccess(Protocol):
    """What the attacker may call: top-k ids (and scores, or None) per query; ``queries`` counts every query."""

    queries: int

    def search(self, query: str | np.ndarray, k: int) -> Answer: ...


def ask(endpoint: SearchAccess, texts: Sequence[str], k: int) -> list[Answer]:
    """Answers to ``texts``, batched where the endpoint offers ``search_many``."""
    many = getattr(endpoint, "search_many", None)
    if many is not None:
        return many(list(texts), k)
    return [endpoint.search(t, k) for t in texts]


def _answers(hits: list[list[tuple[str, float | None]]]) -> list[Answer]:
    out: list[Answer] = []
    for row in hits:
        ids = [i for i, _ in row]
        scores = [s for _, s in row]
        out.append((ids, None if any(s is None for s in scores) else [float(s) for s in scores if s is not None]))
    return out


class LocalSearch:
    """The victim's :class:`HiddenKB` answered as ``view`` returns it (the service's code path), in requests of
    ``batch`` queries; counts queries and requests and keeps the query texts in order (``trace``)."""

    def __init__(self, kb: HiddenKB, view: ScoreView | None = None, seed: int = 0, batch: int = 64) -> None:
        self.kb, self.view, self.batch = kb, view or ScoreView(), batch
        self.rng = np.random.default_rng(seed)
        self.queries = self.requests = 0
        self.trace: list[str] = []

    @property
    def calls(self) -> int:
        return self.requests

    def grants(self) -> dict[str, Any]:
        return {"search_endpoint": {"api": self.view.label(), "scores": self.view.scores}}

    def search_many(self, texts: list[str], k: int) -> list[Answer]:
        out: list[Answer] = []
        for i in range(0, len(texts), self.batch):
            part = texts[i : i + self.batch]
            sims = self.kb.similarities(part)
            out.extend(_answers(self.view.top_k(sims, self.kb.ids, k, self.rng)))
            self.queries += len(part)
            self.requests += 1
            self.trace.extend(part)
        return out

    def search(self, query: str | np.ndarray, k: int) -> Answer:
        if isinstance(query, str):
            return self.search_many([query], k)[0]
        q = np.asarray(query, dtype=np.float64).reshape(1, -1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        self.queries += 1
        self.requests += 1
        return _answers(self.view.top_k(q @ self.kb._matrix.T, self.kb.ids, k, self.rng))[0]


class HttpSearch:
    """Client of ``POST {url}/v1/search`` (Bearer key) in requests of ``batch`` queries; ids-only answers give
    scores None. Counts queries and requests and keeps the query texts in order (``trace``)."""

    def __init__(self, url: str, api_key: str | None = None, batch: int = 64, client: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1/search"):
            self.url += "/v1/search"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=120.0, headers=headers)
        self.batch = batch
        self.queries = self.requests = 0
        self.trace: list[str] = []

    def search_many(self, texts: list[str], k: int) -> list[Answer]:
        import httpx

        out: list[Answer] = []
        for i in range(0, len(texts), self.batch):
            part = texts[i : i + self.batch]
            try:
                resp = self._client.post(self.url, json={"query": part, "top_k": k})
            except httpx.HTTPError as exc:
                raise LeaklabError(f"search endpoint {self.url} unreachable: {exc}") from None
            self.queries += len(part)
            self.requests += 1
            self.trace.extend(part)
            if resp.status_code != 200:
                raise LeaklabError(f"search endpoint {self.url} answered {resp.status_code}: {resp.text[:200]}")
            rows = resp.json().get("data")
            if not isinstance(rows, list) or len(rows) != len(part):
                raise LeaklabError(f"search endpoint {self.url} answered no result list per query")
            out.extend(_answers([[(str(h["id"]), h.get("score")) for h in r.get("results", [])] for r in rows]))
        return out

    def search(self, query: str | np.ndarray, k: int) -> Answer:
        if not isinstance(query, str):
            raise LeaklabError("the HTTP search endpoint takes query texts, not vectors")
        return self.search_many([query], k)[0]

    def close(self) -> None:
        self._client.close()


class VectorSearch:
    """Offline search of recovered document vectors d̂ with the attacker's own copy of the encoder: score
    ⟨e(q), d̂⟩; ``queries`` counts these offline queries (no endpoint request)."""

    def __init__(self, encoder: Encoder, vectors: Mapping[str, np.ndarray]) -> None:
        self.encoder = encoder
        self.ids = list(vectors)
        mat = np.stack([np.asarray(vectors[i], dtype=np.float64) for i in self.ids]) if self.ids else np.zeros((0, 1))
        self.matrix = mat / np.linalg.norm(mat, axis=1, keepdims=True).clip(1e-12) if self.ids else mat
        self.queries = 0

    def search_many(self, texts: list[str], k: int) -> list[Answer]:
        self.queries += len(texts)
        q = self.encoder.embed(texts).astype(np.float64)
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
        return _answers(ScoreView(decimals=6).top_k(q @ self.matrix.T, self.ids, k, np.random.default_rng(0)))

    def search(self, query: str | np.ndarray, k: int) -> Answer:
        if not isinstance(query, str):
            raise LeaklabError("offline search takes query texts")
        return self.search_many([query], k)[0]


# ----------------------------------------------------------------------------- the attack


@dataclass(frozen=True)
class Part:
    """What the shared pass searches: a whole slot, or positions [lo, hi) of a digits slot."""

    slot: Slot
    lo: int = 0
    hi: int = 0

    def queries(self, template: Template, candidates: list[str], bare: bool = False) -> list[str]:
        """The template with this part filled by each candidate, other slots blank (digits: other positions 0);
        ``bare``: the value alone."""
        if self.hi:
            pad = "0" * self.slot.digits
            candidates = [pad[: self.lo] + c + pad[self.hi :] for c in candidates]
        return list(candidates) if bare else [template.fill({self.slot.key: c}) for c in candidates]


@dataclass
class RecordGuess:
    """The attack's answer for one located record: slot values, the best returned signal, whether the record
    itself was returned at ``exact_score`` (scores only), and the endpoint query count when it was settled."""

    doc_id: str
    values: dict[str, str]
    signal: float
    exact: bool
    settled_at: int


@dataclass
class SecretsResult:
    guesses: dict[str, RecordGuess]
    mode: str  # "scores" or "ranks"
    located: int
    noisy: bool
    quantised: bool
    queries: int
    info: dict[str, Any] = field(default_factory=dict)


class KBSecretsAttack:
    """Locate the records of one template, search slot values with shared queries, settle each record by a
    beam over the slots' best candidates (see the module docstring)."""

    def __init__(
        self,
        template: Template,
        candidates: Mapping[str, Sequence[str]],
        top_k: int = 100,
        beam: int = 5,
        digit_chunk: int = 2,
        max_combos: int = 27,
        signal: str = "auto",
        exact_score: float = 0.9995,
        locate_probes: int = 4,
        sweeps: int = 3,
        refine_above: float = 0.9,
        sharp_rank: int = 2,
        seed: int = 0,
    ) -> None:
        if signal not in SIGNALS:
            raise LeaklabError(f"signal must be one of {', '.join(SIGNALS)} (got {signal!r})")
        self.template = template
        self.candidates = {s.key: list(candidates[s.key]) for s in template.slots}
        for slot in template.slots:
            if not self.candidates[slot.key]:
                raise LeaklabError(f"slot {{{slot.space}}} has an empty candidate list")
        self.top_k, self.beam, self.chunk, self.max_combos = top_k, beam, max(1, digit_chunk), max_combos
        self.signal, self.exact_score = signal, exact_score
        self.locate_probes, self.sweeps, self.sharp_rank = max(1, locate_probes), sweeps, sharp_rank
        self.refine_above = refine_above
        self.rng = np.random.default_rng(seed)

    def parts(self) -> list[tuple[Part, list[str]]]:
        """The searched parts and their candidates: a digits slot longer than the chunk is split in chunks."""
        out = []
        for slot in self.template.slots:
            if slot.digits > self.chunk:
                for lo in range(0, slot.digits, self.chunk):
                    hi = min(slot.digits, lo + self.chunk)
                    out.append((Part(slot, lo, hi), [f"{i:0{hi - lo}d}" for i in range(10 ** (hi - lo))]))
            else:
                out.append((Part(slot), self.candidates[slot.key]))
        return out

    def _locate(self, endpoint: SearchAccess) -> tuple[str, bool, bool, set[str]]:
        """The blank template twice and random fills: the signal mode, whether scores are noisy/quantised, and
        the returned documents."""
        fills = [
            self.template.fill({s.key: str(self.rng.choice(self.candidates[s.key])) for s in self.template.slots})
            for _ in range(self.locate_probes - 1)
        ]
        blank = self.template.fill({})
        answers = ask(endpoint, [blank, blank, *fills], self.top_k)
        has_scores = all(a[1] is not None for a in answers)
        if self.signal == "scores" and not has_scores:
            raise LeaklabError(
                "the search endpoint returns ids only, but signal=scores needs scores: use signal=auto or ranks"
            )
        located = {d for ids, _ in answers for d in ids}
        if self.signal == "ranks" or not has_scores:
            return "ranks", False, False, located
        first, second = (dict(zip(a[0], a[1] or [], strict=True)) for a in answers[:2])
        noisy = any(abs(first[i] - second[i]) > 1e-6 for i in first.keys() & second.keys())
        scores = [s for a in answers for s in (a[1] or [])]
        quantised = len(set(scores)) < len(scores) / 2
        return "scores", noisy, quantised, located

    @staticmethod
    def _signal(answer: Answer, mode: str) -> dict[str, float]:
        """Per returned doc: its score (ties broken by rank) or, ranks only, −rank."""
        ids, scores = answer
        if mode == "scores" and scores is not None:
            return {d: s - 1e-7 * r for r, (d, s) in enumerate(zip(ids, scores, strict=True))}
        return {d: -float(r) for r, d in enumerate(ids)}

    def run(self, endpoint: SearchAccess) -> SecretsResult:
        start = endpoint.queries
        mode, noisy, quantised, located = self._locate(endpoint)
        early = mode == "scores" and not noisy and not quantised
        parts = self.parts()
        tables = self._shared_pass(endpoint, parts, mode)
        if mode == "ranks":
            records = self._sharp_records(located, tables)
            guesses = {d: self._rank_guess(d, parts, tables, endpoint.queries) for d in records}
            return SecretsResult(guesses, mode, len(records), noisy, quantised, endpoint.queries - start)
        records = self._records([row for rows in tables for row in rows], mode)
        beams = {d: self._beams(d, parts, tables) for d in records}
        guesses = self._settle(endpoint, beams, early, mode)
        self._refine_digits(endpoint, guesses, early)
        return SecretsResult(guesses, mode, len(records), noisy, quantised, endpoint.queries - start)

    def _shared_pass(
        self, endpoint: SearchAccess, parts: list[tuple[Part, list[str]]], mode: str
    ) -> list[list[dict[str, float]]]:
        """Per part, the signal of every returned document for each candidate. With scores, the candidate sits in
        the template (other slots blank); ids only, the candidate is sent alone, so that the record holding it
        rises to the top of the ranking. A query text repeated across parts is sent once."""
        texts = [part.queries(self.template, cands, bare=mode == "ranks") for part, cands in parts]
        unique = list(dict.fromkeys(t for ts in texts for t in ts))
        answers = dict(zip(unique, ask(endpoint, unique, self.top_k), strict=True))
        return [[self._signal(answers[t], mode) for t in ts] for ts in texts]

    def _sharp_records(self, located: set[str], tables: list[list[dict[str, float]]]) -> list[str]:
        """Ids only: the located documents that some candidate of every part puts within the first
        ``sharp_rank`` + 1 results."""
        best = [{d: max(row.get(d, -np.inf) for row in rows) for d in located} for rows in tables]
        return sorted(d for d in located if all(b[d] >= -self.sharp_rank for b in best))

    def _rank_guess(
        self, doc: str, parts: list[tuple[Part, list[str]]], tables: list[list[dict[str, float]]], at: int
    ) -> RecordGuess:
        """Ids only: per part the candidate that ranks ``doc`` highest (a repeated slot space takes the next
        best unused value)."""
        values: dict[str, str] = {}
        used: dict[str, set[str]] = {}
        for (part, cands), rows in zip(parts, tables, strict=True):
            sig = np.array([row.get(doc, -np.inf) for row in rows])
            taken = used.setdefault(part.slot.space, set()) if not part.hi else set()
            pick = next(cands[i] for i in np.argsort(-sig, kind="stable") if cands[i] not in taken)
            taken.add(pick)
            values[part.slot.key] = values.get(part.slot.key, "") + pick
        return RecordGuess(doc, values, 0.0, False, at)

    def _records(self, rows: list[dict[str, float]], mode: str) -> list[str]:
        """The template's records: the documents above the largest gap in the mean signal over the shared
        queries (an unreturned document counts as the answer's lowest score, or rank ``top_k``)."""
        docs = sorted({d for row in rows for d in row})
        floors = [min(row.values()) - 1e-3 if mode == "scores" else -float(self.top_k) for row in rows]
        mean = {d: float(np.mean([row.get(d, f) for row, f in zip(rows, floors, strict=True)])) for d in docs}
        ranked = sorted(docs, key=lambda d: -mean[d])
        if len(ranked) < 2:
            return ranked
        gaps = [mean[a] - mean[b] for a, b in itertools.pairwise(ranked)]
        return ranked[: int(np.argmax(gaps)) + 1]

    def _beams(
        self, doc: str, parts: list[tuple[Part, list[str]]], tables: list[list[dict[str, float]]]
    ) -> list[list[str]]:
        """Per part, the ``beam`` candidates with the highest signal for ``doc`` (unreturned: lowest)."""
        out = []
        for (_, cands), rows in zip(parts, tables, strict=True):
            sig = np.array([row.get(doc, -np.inf) for row in rows])
            order = np.argsort(-sig, kind="stable")[: self.beam]
            out.append([cands[i] for i in order])
        return out

    def _combos(self, beams: list[list[str]]) -> list[dict[str, str]]:
        """Slot values of the beams' product, best-first by summed rank, at most ``max_combos``."""
        parts = self.parts()
        ranked = sorted(itertools.product(*(range(len(b)) for b in beams)), key=lambda idx: (sum(idx), idx))[
            : self.max_combos
        ]
        out = []
        for idx in ranked:
            values: dict[str, str] = {}
            for (part, _), b, i in zip(parts, beams, idx, strict=True):
                values[part.slot.key] = values.get(part.slot.key, "") + b[i]
            out.append(values)
        return out

    def _settle(
        self, endpoint: SearchAccess, beams: dict[str, list[list[str]]], early: bool, mode: str
    ) -> dict[str, RecordGuess]:
        """All records in lock-step: round r sends each unsettled record's r-th combination, one request batch."""
        combos = {d: self._combos(b) for d, b in beams.items()}
        best: dict[str, RecordGuess] = {}
        active = set(combos)
        for r in range(max((len(c) for c in combos.values()), default=0)):
            asks = [(d, combos[d][r]) for d in combos if d in active and r < len(combos[d])]
            if not asks:
                break
            answers = ask(endpoint, [self.template.fill(v) for _, v in asks], self.top_k)
            for (d, values), answer in zip(asks, answers, strict=True):
                sig = self._signal(answer, mode).get(d, -np.inf)
                exact = early and sig >= self.exact_score - 1e-6
                if d not in best or sig > best[d].signal:
                    best[d] = RecordGuess(d, values, float(sig), exact, endpoint.queries)
                if exact:
                    active.discard(d)
            for d in list(active):
                if r + 1 >= len(combos[d]):
                    active.discard(d)
                    best[d].settled_at = endpoint.queries
        return best

    def _refine_digits(self, endpoint: SearchAccess, guesses: dict[str, RecordGuess], early: bool) -> None:
        """Digits position by position for the records not yet exact whose score is at least ``refine_above``:
        all other digits at one position with the rest fixed, then at each adjacent pair of positions (99
        edits; escapes a single position's local optimum), one lock-step batch per move, keeping the best
        score; up to ``sweeps`` rounds while a round improves some record."""
        slots = [s for s in self.template.slots if s.digits]
        moves = [(s.key, (p,)) for s in slots for p in range(s.digits)]
        moves += [(s.key, (p, p + 1)) for s in slots for p in range(s.digits - 1)]
        todo = [d for d, g in guesses.items() if not g.exact and g.signal >= self.refine_above]
        for _ in range(self.sweeps if slots else 0):
            before = {d: guesses[d].signal for d in todo}
            for key, positions in moves:
                asks = [(d, v) for d in todo for v in _digit_edits(guesses[d].values, key, positions)]
                if not asks:
                    return
                answers = ask(endpoint, [self.template.fill(v) for _, v in asks], self.top_k)
                for (d, values), answer in zip(asks, answers, strict=True):
                    sig = self._signal(answer, "scores").get(d, -np.inf)
                    if sig > guesses[d].signal:
                        exact = early and sig >= self.exact_score - 1e-6
                        guesses[d] = RecordGuess(d, values, float(sig), exact, endpoint.queries)
                for d in todo:
                    guesses[d].settled_at = endpoint.queries
                todo = [d for d in todo if not guesses[d].exact]
            todo = [d for d in todo if guesses[d].signal > before[d]]


def _digit_edits(values: dict[str, str], key: str, positions: tuple[int, ...]) -> list[dict[str, str]]:
    """``values`` with the digits of slot ``key`` at ``positions`` replaced by every other combination."""
    cur = values[key]
    out = []
    for combo in itertools.product("0123456789", repeat=len(positions)):
        new = list(cur)
        for p, v in zip(positions, combo, strict=True):
            new[p] = v
        if "".join(new) != cur:
            out.append({**values, key: "".join(new)})
    return out


class _ScoredIndex:
    """A :class:`SearchAccess` seen as the (id, score) index that :class:`KBVectorRecovery` queries."""

    def __init__(self, endpoint: SearchAccess) -> None:
        self.endpoint = endpoint

    @property
    def queries(self) -> int:
        return self.endpoint.queries

    def search(self, texts: str | Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        out = []
        for ids, scores in ask(self.endpoint, [texts] if isinstance(texts, str) else list(texts), k):
            if scores is None:
                raise LeaklabError("encoder_known recovers document vectors from scores: the endpoint returns ids only")
            out.append(list(zip(ids, scores, strict=True)))
        return out

    def hits(self, texts: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """(id, score) pairs per query text, as :class:`~leaklab.attacks.embedding.access.SearchEndpoint` gives
        them to :class:`KBVectorRecovery`."""
        return self.search(list(texts), k)


def recover_vectors(
    endpoint: SearchAccess,
    encoder: Encoder,
    templates: Sequence[Template],
    lists: Mapping[str, Sequence[str]] | None,
    probes: int,
    top_k: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], int]:
    """Encoder known: least-squares document vectors (kb-extract's :class:`KBVectorRecovery`) from the scores of
    ``probes`` random fills per template; the vectors of documents returned at least ``dim`` times, and the
    endpoint queries spent."""
    from leaklab.attacks.embedding.kb import KBVectorRecovery

    rng = np.random.default_rng(seed)
    cands = {(i, s.key): candidates_of(s, lists) for i, t in enumerate(templates) for s in t.slots}
    texts = [
        t.fill({s.key: str(cands[i, s.key][rng.integers(len(cands[i, s.key]))]) for s in t.slots})
        for i, t in enumerate(templates)
        for _ in range(probes)
    ]
    vocab = sorted({w for t in texts for w in t.split()})
    start = endpoint.queries
    rec = KBVectorRecovery(encoder, texts, vocab, top_k=top_k, max_rounds=0, seed=seed).run(_ScoredIndex(endpoint))
    kept = {d: v for d, v in rec.vectors.items() if rec.observations[d] >= encoder.dim}
    return kept, endpoint.queries - start


# ----------------------------------------------------------------------------- scoring and registration


@dataclass
class RecordValues:
    """A recorded guess as the runner reads it back from a prediction."""

    values: dict[str, str]
    settled_at: int | None


def score_guesses(
    kb: PlantedKB, results: Mapping[str, SecretsResult], templates: Mapping[str, Template]
) -> dict[str, Any]:
    """Exact recovery per secret, per template and per slot kind (scoring only: reads the planted values)."""
    return score_values(kb, {n: r.guesses for n, r in results.items()}, templates)


def score_values(kb: PlantedKB, guesses: Mapping[str, Mapping[str, Any]], templates: Mapping[str, Template]) -> dict:
    """:func:`score_guesses` of per-template guesses {doc id: guess with ``values`` and ``settled_at``} (objects or
    dicts)."""
    per_secret = []
    for sec in kb.secrets:
        guess = guesses.get(sec.template, {}).get(sec.doc_id)
        if isinstance(guess, dict):
            guess = RecordValues(guess["values"], guess["settled_at"])
        slots = templates[sec.template].slots
        hits = {s.key: bool(guess and guess.values.get(s.key) == sec.value(s.key)) for s in slots}
        per_secret.append(
            {
                "doc_id": sec.doc_id,
                "template": sec.template,
                "exact": all(hits.values()),
                "slots": {s.key: (s.kind, hits[s.key]) for s in slots},
                "settled_at": guess.settled_at if guess else None,
                "located": guess is not None,
            }
        )
    by_template: dict[str, list[bool]] = {}
    by_kind: dict[str, list[bool]] = {}
    for row in per_secret:
        by_template.setdefault(row["template"], []).append(row["exact"])
        for kind, hit in row["slots"].values():
            by_kind.setdefault(kind, []).append(hit)
    return {
        "secrets": len(per_secret),
        "exact_share": float(np.mean([r["exact"] for r in per_secret])),
        "located_share": float(np.mean([r["located"] for r in per_secret])),
        "exact_by_template": {t: float(np.mean(v)) for t, v in by_template.items()},
        "slot_accuracy": {k: float(np.mean(v)) for k, v in by_kind.items()},
        "per_secret": per_secret,
    }


def read_lists(spec: str) -> dict[str, list[str]]:
    """``name=names.txt,word=words.txt``: candidate lists replacing the packaged ones (one value a line)."""
    out: dict[str, list[str]] = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        space, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise LeaklabError(f"option lists: '{item}' is not slot=existing-file")
        out[space.strip()] = [v.strip() for v in Path(path).read_text(encoding="utf-8").splitlines() if v.strip()]
        if not out[space.strip()]:
            raise LeaklabError(f"slot {{{space.strip()}}} has an empty candidate list ({path})")
    return out


@dataclass(frozen=True)
class KbSecretsConfig(Config):
    """Options of planted-secret extraction: the victim KB, what its search API returns, and the search."""

    templates: str = option("pin;diagnosis;vpn", "';'-separated templates: packaged names or texts with {slots}")
    lists: str = option("", "candidate lists replacing packaged ones: slot=file,... (one value a line)")
    kb_docs: int = option(2000, "corpus documents of the knowledge base (private split), besides the n secrets")
    scores: bool = option(True, "the API returns scores (false: ids only, the attack uses ranks)")
    score_noise: float = option(0.0, "σ of Gaussian noise on each returned score (>= 0)")
    score_step: float = option(0.0, "returned scores quantised to multiples of this step (0: off)")
    top_k: int = option(100, "results asked per query (at least 1)")
    beam: int = option(5, "candidates kept per slot (digits: per chunk) for the per-record search")
    digit_chunk: int = option(2, "digit positions searched together (10^chunk shared queries per chunk)")
    max_combos: int = option(27, "most fully filled candidates sent per record")
    signal: str = option("auto", "auto (scores where returned, else ranks), scores (refuse ids-only) or ranks")
    sweeps: int = option(3, "most rounds of position-by-position digit edits (scores only; 0: none)")
    refine_above: float = option(0.9, "digit edits only for records whose best returned score is at least this")
    sharp_rank: int = option(2, "ids only: a record is ranked within the first sharp_rank+1 by a value of each slot")
    exact_score: float = option(0.9995, "a returned score at least this ends a record's search (exact text)")
    encoder_known: bool = option(False, "the attacker holds the encoder: recover document vectors, search offline")
    probes: int = option(500, "encoder_known: random template fills sent per template to recover the vectors")

    def __post_init__(self) -> None:
        at_least(self, 1, "top_k", "beam", "digit_chunk", "max_combos", "kb_docs")
        at_least(self, 0, "sweeps", "score_noise", "score_step", "sharp_rank")
        at_least(self, 1, "probes")
        if self.encoder_known and not self.scores:
            raise LeaklabError("option encoder_known recovers vectors from scores, but scores=false returns ids only")
        if self.signal not in SIGNALS:
            raise LeaklabError(f"option signal={self.signal!r}: must be one of {', '.join(SIGNALS)}")
        if self.signal == "scores" and not self.scores:
            raise LeaklabError("option signal=scores needs scores, but scores=false returns ids only")
        self.parsed()
        lists = read_lists(self.lists)
        for t in self.parsed().values():
            for slot in t.slots:
                candidates_of(slot, lists)

    def parsed(self) -> dict[str, Template]:
        names = [t.strip() for t in self.templates.split(";") if t.strip()]
        if not names:
            raise LeaklabError("option templates is empty")
        return {n: template_of(n) for n in names}

    def view(self) -> ScoreView:
        return ScoreView(self.scores, self.score_noise, self.score_step)

    def attack(self, template: Template, lists: Mapping[str, Sequence[str]], seed: int) -> KBSecretsAttack:
        return KBSecretsAttack(
            template,
            {s.key: candidates_of(s, lists) for s in template.slots},
            top_k=self.top_k,
            beam=self.beam,
            digit_chunk=self.digit_chunk,
            max_combos=self.max_combos,
            signal=self.signal,
            exact_score=self.exact_score,
            sweeps=self.sweeps,
            refine_above=self.refine_above,
            sharp_rank=self.sharp_rank,
            seed=seed,
        )


def victim_kb(scn: Scenario, cfg: KbSecretsConfig) -> PlantedKB:
    """``kb_docs`` private-split corpus texts with ``scn.n`` planted secrets (victim side)."""
    from leaklab.corpora.sampling import split_of

    base = [t for t in scn.corpus_obj.texts if split_of(t) == "private"][: cfg.kb_docs]
    return plant_secrets(base, list(cfg.parsed()), scn.n, scn.seed, read_lists(cfg.lists))


def run_secrets(
    endpoint: SearchAccess, cfg: KbSecretsConfig, seed: int = 0
) -> tuple[dict[str, SecretsResult], dict[str, Template]]:
    """The attack for each template in turn against one endpoint."""
    templates = cfg.parsed()
    lists = read_lists(cfg.lists)
    return {name: cfg.attack(t, lists, seed).run(endpoint) for name, t in templates.items()}, templates


ACCESS = "search endpoint only: query texts -> top-k ids, with scores where the API returns them; template known"


@EMBED_ATTACKS.register("kb-secrets", config=KbSecretsConfig, access=ACCESS, case="kb-secrets")
def attack(access: Access, public: PublicData, cfg: KbSecretsConfig) -> Prediction:
    """Extract planted secret records (PINs, diagnoses, passwords) from a KB through similarity queries."""
    endpoint = access.need("search")
    offline: dict[str, int] = {}
    if cfg.encoder_known:
        local = access.need("weights").encoder
        vectors, _ = recover_vectors(
            endpoint, local, list(cfg.parsed().values()), read_lists(cfg.lists), cfg.probes, cfg.top_k, public.seed
        )
        search = VectorSearch(local, vectors)
        results, templates = run_secrets(search, cfg, public.seed)
        offline = {"offline_queries": search.queries, "recovered_vectors": len(vectors)}
    else:
        results, templates = run_secrets(endpoint, cfg, public.seed)
    guesses = {
        name: {d: {"values": g.values, "settled_at": g.settled_at} for d, g in res.guesses.items()}
        for name, res in results.items()
    }
    ids = [d for res in results.values() for d in res.guesses]
    return Prediction(
        texts=[_pred_text(results, templates, d) for d in ids],
        ids=ids,
        measures={"signal": {n: r.mode for n, r in results.items()}, **offline},
        notes={"template_known": True, "encoder_known": cfg.encoder_known},
        info={"located": {n: r.located for n, r in results.items()}, "guesses": guesses},
    )


def _pred_text(results: Mapping[str, SecretsResult], templates: Mapping[str, Template], doc_id: str) -> str:
    for name, res in results.items():
        if doc_id in res.guesses:
            return templates[name].fill(res.guesses[doc_id].values)
    return ""
