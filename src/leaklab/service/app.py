"""The embedding service: FastAPI app with OpenAI-shaped /v1/embeddings, /v1/search over a document index,
API keys, rate limits and daily quotas, defenses on returned vectors, probe monitoring and a durable log.

No ``from __future__ import annotations`` here: FastAPI must resolve the closures used as dependencies.
"""

import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from leaklab.encoders import Encoder
from leaklab.errors import LeaklabError
from leaklab.service.config import ServiceConfig
from leaklab.service.defenses import GaussianNoise, Pipeline
from leaklab.service.encoders import text_hash, vector_hash
from leaklab.service.guard import STATE_KEY, BodyGuard, error_body
from leaklab.service.monitor import Monitor
from leaklab.service.ratelimit import RateLimiter, retry_after
from leaklab.service.scheduler import Busy, FairScheduler
from leaklab.service.search_scores import Hit, ScoreView
from leaklab.service.store import KeyRecord, LogRow, Store, utc_day


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}
        self.param = param


def valid_unicode(value: str | list[str]) -> str | list[str]:
    """Refuse text that cannot be encoded as UTF-8 (an unpaired surrogate such as a lone \\ud800)."""
    for i, text in enumerate([value] if isinstance(value, str) else value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = "" if isinstance(value, str) else f" (text {i})"
            raise ValueError(f"invalid Unicode{where}: unpaired surrogate at character {exc.start}") from None
    return value


class EmbeddingRequest(BaseModel):
    input: str | list[str] = Field(description="A text or a list of texts (non-empty).")
    model: str | None = Field(default=None, description="Ignored beyond a check; the server serves one model.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Return only the first N dimensions.")
    user: str | None = None

    _unicode = field_validator("input")(valid_unicode)


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

    _unicode = field_validator("query")(valid_unicode)


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorDetail


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


def _validation_message(exc: RequestValidationError, request: Request) -> tuple[str, str | None]:
    """One line from pydantic's first error: where and what, never the offending value (which may be NaN or
    invalid Unicode and is the client's own anyway)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None  # the top-level field, as OpenAI names it
    msg = f"'{'.'.join(loc)}': {first['msg']}" if param else f"request body: {first['msg']}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error(s))"
    ctype = request.headers.get("content-type", "")
    if param is None and "json" not in ctype.lower():
        msg += "; send a JSON object with 'Content-Type: application/json'"
    return msg, param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = error_body(exc.message, exc.kind, exc.status, exc.param)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request)
        return JSONResponse(error_body(message, "invalid_request_error", 400, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = error_body(str(exc.detail), kind, exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def create_app(cfg: ServiceConfig, store: Store, encoder: Encoder, index: DocumentIndex | None = None) -> FastAPI:
    """The FastAPI application; all state (store, limiter, monitor, scheduler, index) is held by the closure.

    Order of work per request: key (from the headers, before the body is read) → body size → validation →
    request quota → rate-limit token → the key's slot (fair queue) → token count and budget → token quota →
    encoder turns, one chunk at a time → defenses → atomic log + usage + monitor state.
    """
    _validate_pipelines(cfg, encoder.dim)
    index = index or DocumentIndex([], np.zeros((0, encoder.dim), dtype=np.float32))
    limiter = RateLimiter()
    scheduler = FairScheduler(cfg.server.queue_timeout_s)
    vocab = frozenset(w for w in encoder.tokenizer.get_vocab() if w.isalpha())
    monitor = Monitor(cfg.monitor.window, cfg.monitor.min_queries, cfg.monitor.threshold, vocab)
    monitor.restore(store.monitor_states())
    escalation = GaussianNoise(epsilon=cfg.monitor.noise_epsilon)
    probe = np.eye(1, encoder.dim, dtype=np.float32)
    bearer = HTTPBearer(auto_error=False, description="API key from `leaklab keys create`.")
    app = FastAPI(title="leaklab embedding service", version="1", description=__doc__)
    app.add_middleware(BodyGuard, authenticate=store.authenticate, max_body=cfg.server.max_body_bytes)
    _install_error_handlers(app)
    errors = {s: {"model": ErrorBody} for s in (400, 401, 413, 429, 503)}

    def authenticate(
        request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> KeyRecord:
        rec = getattr(request.state, STATE_KEY, None)  # set by the guard from the same header
        if rec is None and cred is not None and cred.scheme.lower() == "bearer":
            rec = store.authenticate(cred.credentials)
        if rec is None:
            raise ApiError(401, "invalid or missing API key", "invalid_request_error", {"WWW-Authenticate": "Bearer"})
        return rec

    def texts_of(value: str | list[str], field: str, key: KeyRecord) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        lim = cfg.limits_for(key.name)
        if not texts:
            raise ApiError(400, f"'{field}' must not be empty", "invalid_request_error", param=field)
        if lim.max_inputs and len(texts) > lim.max_inputs:
            raise ApiError(
                400,
                f"'{field}' holds {len(texts)} texts; at most {lim.max_inputs}",
                "invalid_request_error",
                param=field,
            )
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(400, f"'{field}'[{i}] is empty", "invalid_request_error", param=field)
            if lim.max_chars and len(t) > lim.max_chars:
                raise ApiError(
                    400,
                    f"'{field}'[{i}] has {len(t)} characters; at most {lim.max_chars}",
                    "invalid_request_error",
                    param=field,
                )
        return texts

    def admit_rate(key: KeyRecord) -> None:
        lim = cfg.limits_for(key.name)
        rate = lim.rate
        if monitor.mitigation(key.id) == "throttle":
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
            lim.daily_tokens and tok + max(tokens, 1) > lim.daily_tokens
        ):
            raise quota_error(key)

    def admit(key: KeyRecord) -> None:
        """Checks before any encoder work, in order: request quota (and a token left), then the rate token."""
        precheck_quota(key, 0)
        admit_rate(key)

    @asynccontextmanager
    async def slot(key: KeyRecord) -> AsyncIterator[None]:
        try:
            async with scheduler.admit(key.id, cfg.limits_for(key.name).max_concurrent):
                yield
        except Busy as exc:
            raise ApiError(
                503,
                f"busy: this key's earlier requests held the server for {exc.waited:.1f}s; retry later",
                "server_busy",
                {"Retry-After": retry_after(exc.retry_after)},
            ) from None

    def count_tokens(key: KeyRecord, texts: list[str], field: str) -> list[int]:
        counts = encoder.token_counts(texts)
        budget = cfg.limits_for(key.name).max_request_tokens
        if budget and sum(counts) > budget:
            raise ApiError(
                413,
                f"'{field}' holds {sum(counts)} tokens; at most {budget} per request",
                "request_too_large",
                param=field,
            )
        precheck_quota(key, sum(counts))
        return counts

    def embed_fairly(key: KeyRecord, texts: list[str]) -> np.ndarray:
        """The encoder in chunks of ``server.encode_chunk`` texts, one chunk per turn (round-robin over keys)."""
        step = cfg.server.encode_chunk
        parts = []
        for i in range(0, len(texts), step):
            with scheduler.turn(key.id):
                parts.append(encoder.embed(texts[i : i + step]))
        return np.concatenate(parts)

    def observe(key: KeyRecord, texts: list[str], clean: np.ndarray) -> None:
        if not cfg.monitor.enabled:
            return
        verdict = monitor.observe(key.id, texts, clean, action=cfg.monitor.action)
        if verdict.new_flag:
            evidence = {
                "features": {k: round(v, 3) for k, v in verdict.features.items()},
                "queries": monitor.sessions[key.id].count,
            }
            store.add_flag(key.id, verdict.score, monitor.mitigation(key.id) or cfg.monitor.action, evidence)

    def commit(key: KeyRecord, route: str, rows: list[LogRow], defense: str) -> str:
        lim = cfg.limits_for(key.name)
        state = monitor.state(key.id) if key.id in monitor.sessions else None
        request_id = store.admit_and_log(
            key.id, route, rows, defense, lim.daily_requests, lim.daily_tokens, monitor=state
        )
        if request_id is None:
            raise quota_error(key)
        return request_id

    def respond(data: list[dict], counts: list[int], request_id: str) -> JSONResponse:
        total = sum(counts)
        body = {
            "object": "list",
            "data": data,
            "model": encoder.name,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }
        return JSONResponse(body, headers={"X-Request-Id": request_id})

    def check_embedding_request(body: EmbeddingRequest, key: KeyRecord) -> list[str]:
        texts = texts_of(body.input, "input", key)
        if body.model not in (None, "", encoder.name):
            raise ApiError(
                400,
                f"model '{body.model}' is not served; this server serves '{encoder.name}'",
                "invalid_request_error",
                param="model",
            )
        size = cfg.pipeline_for(key.name).apply(probe, key.tenant).shape[1]
        if body.dimensions is not None and body.dimensions > size:
            raise ApiError(
                400,
                f"dimensions={body.dimensions} exceeds the returned size {size}",
                "invalid_request_error",
                param="dimensions",
            )
        return texts

    def embed_response(body: EmbeddingRequest, key: KeyRecord, texts: list[str]) -> JSONResponse:
        counts = count_tokens(key, texts, "input")
        clean = embed_fairly(key, texts)
        observe(key, texts, clean)
        pipe: Pipeline = cfg.pipeline_for(key.name)
        if monitor.mitigation(key.id) == "noise":
            pipe = pipe.with_extra(escalation)
        out = pipe.apply(clean, key.tenant)
        if body.dimensions is not None:
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

    def search_response(body: SearchRequest, key: KeyRecord, texts: list[str]) -> JSONResponse:
        counts = count_tokens(key, texts, "query")
        clean = embed_fairly(key, texts)
        observe(key, texts, clean)
        view = cfg.search.view()
        if monitor.mitigation(key.id) == "noise":
            view = cfg.monitor.escalate(view)
        hits = index.top_k(clean, body.top_k, view)
        rows = [LogRow(text_hash(t), c, text_hash(repr(h))) for t, c, h in zip(texts, counts, hits, strict=True)]
        request_id = commit(key, "search", rows, view.label())
        data = [{"results": [{"id": i} if s is None else {"id": i, "score": s} for i, s in h]} for h in hits]
        return respond(data, counts, request_id)

    @app.get("/health")
    def health() -> dict:
        """Liveness and what is served (no key needed)."""
        return {"status": "ok", "model": encoder.name, "dim": encoder.dim, "documents": len(index.ids)}

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors)
    async def embeddings(body: EmbeddingRequest, key: Annotated[KeyRecord, Depends(authenticate)]) -> JSONResponse:
        """OpenAI-compatible embeddings; vectors pass through the key's defenses before they are returned."""
        texts = check_embedding_request(body, key)
        admit(key)
        async with slot(key):
            return await run_in_threadpool(embed_response, body, key, texts)

    @app.post("/v1/search", response_model=SearchResponse, responses=errors)
    async def search(body: SearchRequest, key: Annotated[KeyRecord, Depends(authenticate)]) -> JSONResponse:
        """Top-k cosine search over the indexed documents (the knowledge-base scenario)."""
        texts = texts_of(body.query, "query", key)
        if body.top_k > cfg.search.max_top_k:
            raise ApiError(
                400,
                f"top_k={body.top_k} exceeds the maximum {cfg.search.max_top_k}",
                "invalid_request_error",
                param="top_k",
            )
        admit(key)
        async with slot(key):
            return await run_in_threadpool(search_response, body, key, texts)

    app.state.store, app.state.monitor, app.state.index = store, monitor, index
    app.state.scheduler = scheduler
    return app
