"""The embedding service: FastAPI app with OpenAI-shaped /v1/embeddings, /v1/search over a document index,
API keys, rate limits and daily quotas, defenses on returned vectors, probe monitoring and a durable log.

No ``from __future__ import annotations`` here: FastAPI must resolve the closures used as dependencies.
"""

import base64
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from leaklab.encoders import Encoder
from leaklab.errors import LeaklabError
from leaklab.service.config import ServiceConfig
from leaklab.service.defenses import GaussianNoise, Pipeline
from leaklab.service.encoders import text_hash, vector_hash
from leaklab.service.monitor import Monitor
from leaklab.service.ratelimit import RateLimiter, retry_after
from leaklab.service.search_scores import Hit, ScoreView
from leaklab.service.store import KeyRecord, LogRow, Store, utc_day


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class EmbeddingRequest(BaseModel):
    input: str | list[str] = Field(description="A text or a list of texts (non-empty).")
    model: str | None = Field(default=None, description="Ignored beyond a check; the server serves one model.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Return only the first N dimensions.")
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class SearchRequest(BaseModel):
    query: str | list[str]
    top_k: int = Field(default=10, ge=1)


class SearchHit(BaseModel):
    id: str
    score: float | None = Field(default=None, description="Absent when the service returns ids only.")


class SearchResult(BaseModel):
    results: list[SearchHit]


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchResult]
    model: str
    usage: Usage


class ErrorBody(BaseModel):
    error: dict


@dataclass
class DocumentIndex:
    ids: list[str]
    vectors: np.ndarray  # (n, d) unit rows

    def top_k(self, queries: np.ndarray, k: int, view: ScoreView | None = None) -> list[list[Hit]]:
        """Cosine top-k by one matrix product, as ``view`` returns it (default: scores rounded to 4 decimals)."""
        sims = queries @ self.vectors.T if self.ids else np.zeros((len(queries), 0))
        return (view or ScoreView()).top_k(sims, self.ids, k, np.random.default_rng())


def build_index(encoder: Encoder, corpus: str | None, limit: int) -> DocumentIndex:
    """Embed the first ``limit`` texts of ``corpus`` (a corpus name or file) as the searchable documents."""
    if not corpus:
        return DocumentIndex([], np.zeros((0, encoder.dim), dtype=np.float32))
    from leaklab.corpora import load_corpus

    texts = list(load_corpus(corpus).texts[:limit])
    return DocumentIndex([f"doc-{i}" for i in range(len(texts))], encoder.embed(texts))


def _seconds_to_utc_midnight(now: float) -> float:
    return 86400.0 - (now % 86400.0)


def _validate_pipelines(cfg: ServiceConfig, dim: int) -> None:
    probe = np.eye(1, dim, dtype=np.float32)
    for name, pipe in [
        ("defenses", cfg.defenses),
        *((f"keys.{k}.defenses", p) for k, p in cfg.key_defenses.items()),
    ]:
        try:
            pipe.apply(probe, "validation")
        except LeaklabError as exc:
            raise LeaklabError(f"config: {name}: {exc}") from exc


def create_app(cfg: ServiceConfig, store: Store, encoder: Encoder, index: DocumentIndex | None = None) -> FastAPI:
    """The FastAPI application; all state (store, limiter, monitor, index) is held by the closure."""
    _validate_pipelines(cfg, encoder.dim)
    index = index or DocumentIndex([], np.zeros((0, encoder.dim), dtype=np.float32))
    limiter = RateLimiter()
    vocab = frozenset(w for w in encoder.tokenizer.get_vocab() if w.isalpha())
    monitor = Monitor(cfg.monitor.window, cfg.monitor.min_queries, cfg.monitor.threshold, vocab)
    escalation = GaussianNoise(epsilon=cfg.monitor.noise_epsilon)
    bearer = HTTPBearer(auto_error=False, description="API key from `leaklab keys create`.")
    app = FastAPI(title="leaklab embedding service", version="1", description=__doc__)
    errors = {401: {"model": ErrorBody}, 400: {"model": ErrorBody}, 429: {"model": ErrorBody}}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
            status_code=exc.status,
            headers=exc.headers,
        )

    def authenticate(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> KeyRecord:
        if cred is None or cred.scheme.lower() != "bearer":
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                {"WWW-Authenticate": "Bearer"},
            )
        rec = store.authenticate(cred.credentials)
        if rec is None:
            raise ApiError(401, "invalid or revoked API key", "invalid_request_error", {"WWW-Authenticate": "Bearer"})
        return rec

    def texts_of(value: str | list[str], field: str, key: KeyRecord) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        lim = cfg.limits_for(key.name)
        if not texts:
            raise ApiError(400, f"'{field}' must not be empty", "invalid_request_error")
        if lim.max_inputs and len(texts) > lim.max_inputs:
            raise ApiError(
                400, f"'{field}' holds {len(texts)} texts; at most {lim.max_inputs}", "invalid_request_error"
            )
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(400, f"'{field}'[{i}] is empty", "invalid_request_error")
            if lim.max_chars and len(t) > lim.max_chars:
                raise ApiError(
                    400,
                    f"'{field}'[{i}] has {len(t)} characters; at most {lim.max_chars}",
                    "invalid_request_error",
                )
        return texts

    def admit_rate(key: KeyRecord) -> None:
        lim = cfg.limits_for(key.name)
        rate = lim.rate
        if cfg.monitor.action == "throttle" and monitor.is_flagged(key.id):
            rate *= cfg.monitor.throttle_factor or 1.0
        wait = limiter.take(key.id, rate, lim.burst)
        if wait > 0:
            raise ApiError(
                429,
                f"rate limit: {lim.burst} requests burst, {rate:g}/s",
                "rate_limit_exceeded",
                {"Retry-After": retry_after(wait)},
            )

    def quota_error(key: KeyRecord) -> ApiError:
        now = time.time()
        return ApiError(
            429,
            "daily quota exhausted (requests or tokens)",
            "insufficient_quota",
            {"Retry-After": retry_after(_seconds_to_utc_midnight(now))},
        )

    def precheck_quota(key: KeyRecord, tokens: int) -> None:
        lim = cfg.limits_for(key.name)
        req, tok = store.usage(key.id, utc_day(time.time()))
        if (lim.daily_requests and req + 1 > lim.daily_requests) or (
            lim.daily_tokens and tok + tokens > lim.daily_tokens
        ):
            raise quota_error(key)

    def observe(key: KeyRecord, texts: list[str], clean: np.ndarray) -> bool:
        if not cfg.monitor.enabled:
            return False
        verdict = monitor.observe(key.id, texts, clean)
        if verdict.new_flag:
            evidence = {
                "features": {k: round(v, 3) for k, v in verdict.features.items()},
                "queries": monitor.sessions[key.id].count,
            }
            store.add_flag(key.id, verdict.score, cfg.monitor.action, evidence)
        return verdict.flagged

    def commit(key: KeyRecord, route: str, rows: list[LogRow], defense: str) -> str:
        lim = cfg.limits_for(key.name)
        request_id = store.admit_and_log(key.id, route, rows, defense, lim.daily_requests, lim.daily_tokens)
        if request_id is None:
            raise quota_error(key)
        return request_id

    def admit_and_embed(key: KeyRecord, texts: list[str]) -> tuple[list[int], np.ndarray, bool]:
        """Rate limit, token count, quota pre-check, clean vectors, monitor verdict (flagged or not)."""
        admit_rate(key)
        counts = encoder.token_counts(texts)
        precheck_quota(key, sum(counts))
        clean = encoder.embed(texts)
        return counts, clean, observe(key, texts, clean)

    def respond(data: list[dict], counts: list[int], request_id: str) -> JSONResponse:
        total = sum(counts)
        body = {
            "object": "list",
            "data": data,
            "model": encoder.name,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }
        return JSONResponse(body, headers={"X-Request-Id": request_id})

    @app.get("/health")
    def health() -> dict:
        """Liveness and what is served (no key needed)."""
        return {"status": "ok", "model": encoder.name, "dim": encoder.dim, "documents": len(index.ids)}

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors)
    def embeddings(body: EmbeddingRequest, key: Annotated[KeyRecord, Depends(authenticate)]) -> JSONResponse:
        """OpenAI-compatible embeddings; vectors pass through the key's defenses before they are returned."""
        texts = texts_of(body.input, "input", key)
        if body.model not in (None, "", encoder.name):
            raise ApiError(
                400,
                f"model '{body.model}' is not served; this server serves '{encoder.name}'",
                "invalid_request_error",
            )
        counts, clean, flagged = admit_and_embed(key, texts)
        pipe: Pipeline = cfg.pipeline_for(key.name)
        if flagged and cfg.monitor.action == "noise":
            pipe = pipe.with_extra(escalation)
        out = pipe.apply(clean, key.tenant)
        if body.dimensions is not None:
            if body.dimensions > out.shape[1]:
                raise ApiError(
                    400,
                    f"dimensions={body.dimensions} exceeds the returned size {out.shape[1]}",
                    "invalid_request_error",
                )
            out = out[:, : body.dimensions]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        out = np.ascontiguousarray(out, dtype=np.float32)
        rows = [LogRow(text_hash(t), c, vector_hash(v)) for t, c, v in zip(texts, counts, out, strict=True)]
        request_id = commit(key, "embeddings", rows, pipe.describe())
        if body.encoding_format == "base64":
            payload = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in out]
        else:
            payload = out.tolist()
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(payload)]
        return respond(data, counts, request_id)

    @app.post("/v1/search", response_model=SearchResponse, responses=errors)
    def search(body: SearchRequest, key: Annotated[KeyRecord, Depends(authenticate)]) -> JSONResponse:
        """Top-k cosine search over the indexed documents (the knowledge-base scenario)."""
        texts = texts_of(body.query, "query", key)
        if body.top_k > cfg.search.max_top_k:
            raise ApiError(
                400, f"top_k={body.top_k} exceeds the maximum {cfg.search.max_top_k}", "invalid_request_error"
            )
        counts, clean, _ = admit_and_embed(key, texts)
        view = cfg.search.view()
        hits = index.top_k(clean, body.top_k, view)
        rows = [LogRow(text_hash(t), c, text_hash(repr(h))) for t, c, h in zip(texts, counts, hits, strict=True)]
        request_id = commit(key, "search", rows, view.label())
        data = [{"results": [{"id": i} if s is None else {"id": i, "score": s} for i, s in h]} for h in hits]
        return respond(data, counts, request_id)

    app.state.store, app.state.monitor, app.state.index = store, monitor, index
    return app
