"""What an embedding attack may use: access objects the scenario (the victim side) builds, never the victim.

An attack is called as ``attack(access, public, config) -> Prediction``:

- :class:`Access` bundles what the threat model grants: :class:`LeakedVectors` (the vectors that leaked, their
  dimension and the encoder's name), a :class:`BlackBoxEncoder` (``embed(texts)``, every text and request
  counted, an optional query budget), :class:`EncoderWeights` (white-box: the encoder's weights), a
  :class:`SearchEndpoint` (top-k ids, with scores where granted, over a hidden index), :class:`LeakedPairs`
  (k known (text, vector) pairs), a ``reference`` encoder (a public model the attacker holds) and ``hints``
  (any other granted knowledge, e.g. a candidate list). Each part reports its grants; the run record holds them.
- :class:`PublicData` is the attacker's public text (the corpus's public split), never a private text.
- :class:`Prediction` is what the attack returns: recovered texts, membership scores, recovered vectors, ...;
  only the runner scores it against the private texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from leaklab.attacks.base import CannotRun
from leaklab.encoders import CallableEncoder, Encoder, LocalEncoder, Usage, cached_embed

Hit = tuple[str, float]


class BudgetSpent(CannotRun):
    """A query budget granted by the threat model is spent (the attack is reported as 'could not run')."""


def _check_budget(what: str, spent: int, asked: int, budget: int | None) -> None:
    if budget is not None and spent + asked > budget:
        raise BudgetSpent(
            f"{what} query budget of {budget} texts spent: {spent} used, this request asks for {asked} more"
        )


@dataclass(frozen=True)
class LeakedVectors:
    """The vectors that leaked (one per private text, in the victim's order); their dimension and the name of
    the encoder that made them are granted with them."""

    vectors: np.ndarray
    encoder: str

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.vectors)

    def grants(self) -> dict[str, Any]:
        return {"leaked_vectors": {"count": len(self), "dim": self.dim, "encoder": self.encoder}}


class BlackBoxEncoder(CallableEncoder):
    """Black-box ``embed(texts)`` of another encoder: every text, request and token is counted here (a disk-cache
    hit of a local encoder costs the same as a fresh query); ``budget`` caps the texts embedded."""

    def __init__(self, encoder: Encoder, budget: int | None = None) -> None:
        self._inner, self.budget = encoder, budget
        self._cache = isinstance(encoder, LocalEncoder)
        super().__init__(
            self._forward, encoder.dim, encoder.name, None, encoder.tokenizer, encoder.max_seq_len, normalize=False
        )

    def _forward(self, texts: list[str]) -> np.ndarray:
        return cached_embed(self._inner, texts) if self._cache else self._inner.embed(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            _check_budget("embedding", self.usage.queries, len(texts), self.budget)
            before = self._inner.usage.snapshot()
            out = self._forward(texts)
            spent = self._inner.usage.since(before)
            self.usage.queries += spent["queries"]
            self.usage.calls += spent["calls"]
            self.usage.tokens += spent["tokens"]
        return out

    def grants(self) -> dict[str, Any]:
        return {"black_box_encoder": {"encoder": self.name, "budget": self.budget}}


class EncoderWeights:
    """White-box access: the encoder's weights (gradients, token embeddings); its forward passes from the grant
    on are the attack's usage."""

    def __init__(self, encoder: LocalEncoder) -> None:
        self.encoder = encoder
        self._start = encoder.usage.snapshot()

    @property
    def usage(self) -> dict[str, int]:
        return self.encoder.usage.since(self._start)

    def grants(self) -> dict[str, Any]:
        return {"encoder_weights": self.encoder.name}


class SearchIndex(Protocol):
    """A similarity search over hidden documents (:class:`~leaklab.attacks.embedding.kb.HiddenKB` locally,
    :class:`~leaklab.attacks.embedding.kb.HttpKB` remotely): top-k (id, score) per query text."""

    def search(self, query_texts: str | Sequence[str], k: int) -> list[list[Hit]]: ...


class SearchEndpoint:
    """The attacker's side of a search over a hidden index: ``search(query, k) -> (ids, scores | None)``.

    ``scores=False`` grants ids only; a vector query needs an index that takes vectors (``search_vectors``).
    Every query text (or vector) and request is counted; ``budget`` caps the queries."""

    def __init__(self, index: SearchIndex, scores: bool = True, budget: int | None = None) -> None:
        self._index, self.scores, self.budget = index, scores, budget
        self.queries = 0
        self.calls = 0

    def search(self, query: str | np.ndarray, k: int) -> tuple[list[str], list[float] | None]:
        """Top-``k`` ids (best first) for one query text or vector, with their scores where granted."""
        batch = np.asarray(query, dtype=np.float32)[None, :] if not isinstance(query, str) else [query]
        return self.search_many(batch, k)[0]

    def search_many(self, queries: Sequence[str] | np.ndarray, k: int) -> list[tuple[list[str], list[float] | None]]:
        """:meth:`search` of each query, in one request."""
        return [([i for i, _ in row], [s for _, s in row] if self.scores else None) for row in self._ask(queries, k)]

    def hits(self, queries: Sequence[str] | np.ndarray, k: int) -> list[list[Hit]]:
        """(id, score) pairs per query, for attacks that need the scores (refused when only ids are granted)."""
        if not self.scores:
            raise CannotRun("the search endpoint returns ids only; this attack needs the similarity scores")
        return self._ask(queries, k)

    def _ask(self, queries: Sequence[str] | np.ndarray, k: int) -> list[list[Hit]]:
        vectors = isinstance(queries, np.ndarray)
        n = len(queries)
        if not n:
            return []
        _check_budget("search", self.queries, n, self.budget)
        if vectors:
            by_vector = getattr(self._index, "search_vectors", None)
            if by_vector is None:
                raise CannotRun("the search endpoint takes query texts only, not vectors")
            rows = by_vector(queries, k)
        else:
            rows = self._index.search(list(queries), k)
        self.queries += n
        self.calls += 1
        return rows

    def grants(self) -> dict[str, Any]:
        return {"search_endpoint": {"scores": self.scores, "budget": self.budget}}


@dataclass(frozen=True)
class LeakedPairs:
    """k known (text, vector) pairs of the victim's encoder (texts disjoint from the attacked ones)."""

    texts: list[str]
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def grants(self) -> dict[str, Any]:
        return {"leaked_pairs": len(self)}


PARTS = ("vectors", "encoder", "weights", "search", "pairs", "reference")


@dataclass
class Access:
    """What one attack may use; a part left None is not granted (:meth:`need` refuses it with one line)."""

    vectors: LeakedVectors | None = None
    encoder: BlackBoxEncoder | None = None
    weights: EncoderWeights | None = None
    search: SearchEndpoint | None = None
    pairs: LeakedPairs | None = None
    reference: Encoder | None = None  # a public model the attacker holds itself (not the victim's)
    hints: dict[str, Any] = field(default_factory=dict)  # other granted knowledge, recorded as given
    _reference_start: Usage | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.reference is not None:
            self._reference_start = self.reference.usage.snapshot()

    def need(self, part: str) -> Any:
        """The granted ``part`` (one of :data:`PARTS`), or :class:`CannotRun` naming what is missing."""
        value = getattr(self, part)
        if value is None:
            raise CannotRun(f"needs {part} access, which this scenario does not grant")
        return value

    def grants(self) -> dict[str, Any]:
        """Every grant of this access, for the run record."""
        out: dict[str, Any] = {}
        for part in (self.vectors, self.encoder, self.weights, self.search, self.pairs):
            if part is not None:
                out.update(part.grants())
        if self.reference is not None:
            out["reference_encoder"] = self.reference.name
        out.update({f"hint_{k}": _describe(v) for k, v in self.hints.items()})
        return out

    def usage(self) -> dict[str, int]:
        """What the attack spent: black-box texts/requests/tokens, search queries and requests, and the forward
        passes of the white-box encoder (``local_*`` beside a black-box encoder or a search) and of the reference
        encoder (``local_*``)."""
        out: dict[str, int] = {}
        if self.encoder is not None:
            out.update(self.encoder.usage.since(Usage()))
        if self.search is not None:
            out.update({"search_queries": self.search.queries, "search_calls": self.search.calls})
            out.setdefault("queries", self.search.queries)
        if self.weights is not None:
            passes = self.weights.usage
            out.update(passes if not out else {f"local_{k}": v for k, v in passes.items()})
        if self.reference is not None and self._reference_start is not None:
            out.update({f"local_{k}": v for k, v in self.reference.usage.since(self._reference_start).items()})
        return out


def vectors_in_encoder_space(access: Access) -> np.ndarray:
    """The leaked vectors, mapped into the black-box encoder's space when leaked pairs are granted too: the
    orthogonal map R = argmin_{RᵀR=I} ‖V R − A‖_F (V: the pairs' victim vectors, A: their texts embedded through
    the black box, queries counted) is used only if, fitted on half of the pairs, it beats the identity on the
    other half (a victim space that is the attacker's own stays as it is)."""
    from scipy.linalg import orthogonal_procrustes

    leaked = access.need("vectors").vectors
    pairs, enc = access.pairs, access.encoder
    if pairs is None or enc is None or len(pairs) < 2 or pairs.vectors.shape[1] != enc.dim:
        return leaked
    theirs, own = pairs.vectors, enc.embed(pairs.texts)
    half = len(pairs) // 2
    r, _ = orthogonal_procrustes(theirs[:half], own[:half])
    if np.linalg.norm(theirs[half:] @ r - own[half:]) >= np.linalg.norm(theirs[half:] - own[half:]):
        return leaked
    return (leaked @ orthogonal_procrustes(theirs, own)[0]).astype(np.float32)


def _describe(value: Any) -> Any:
    """A hint as recorded: lists by their length, anything else as it is."""
    return f"{len(value)} items" if isinstance(value, list | tuple | np.ndarray) else value


@dataclass(frozen=True)
class PublicData:
    """The attacker's public text: the public split of the scenario's corpus within its length range (shuffled
    with ``seed``), other corpora's public sentences, and pairs it makes by embedding them. ``drop_private``
    is the experimenter's hygiene guard: it removes any private-split text the attacker happened to generate
    (e.g. a span of a public text), so that no attacker training text is a private one."""

    corpus: str
    tokenizer: Any
    seed: int
    min_tokens: int
    max_tokens: int
    all_texts: tuple[str, ...]
    limit: int | None = None
    extra: Callable[[str, bool], list[str]] | None = field(default=None, repr=False)
    private_filter: Callable[[list[str]], list[str]] | None = field(default=None, repr=False)

    def texts(self, limit: int | None = None) -> list[str]:
        limit = limit or self.limit
        return list(self.all_texts[:limit] if limit else self.all_texts)

    def extra_texts(self, corpora: str, any_length: bool = False) -> list[str]:
        """Public-split sentences of other corpora (comma-separated names), never a private text."""
        return self.extra(corpora, any_length) if self.extra is not None else []

    def drop_private(self, texts: list[str]) -> list[str]:
        return self.private_filter(texts) if self.private_filter is not None else texts

    def pairs(self, encoder: Encoder, limit: int | None = None, extra: str = "") -> tuple[list[str], np.ndarray]:
        """(public text, vector) pairs made through ``encoder`` (queries counted there); ``extra`` adds public
        sentences of other corpora."""
        texts = self.texts(limit)
        if extra:
            seen = set(texts)
            texts = texts + [t for t in self.extra_texts(extra) if t not in seen]
        return texts, cached_embed(encoder, texts)


@dataclass
class Prediction:
    """What an embedding attack returns (scored by the runner only).

    ``texts``: one recovery per leaked vector (or per id in ``ids``, for attacks on a search index);
    ``variants``: other named recoveries of the same targets; ``ranked``: ranked candidates per vector;
    ``scores``: named per-item scores (e.g. membership scores per candidate, presence scores); ``vectors``:
    recovered or mapped vectors; ``labels``: cluster labels per id; ``measures``: attacker-side numbers
    (queries per document, the attack's own cosine); ``notes``: how it ran (recorded with the grants)."""

    texts: list[str] = field(default_factory=list)
    ids: list[str] | None = None
    variants: dict[str, list[str]] = field(default_factory=dict)
    ranked: list[list[str]] | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    measures: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
