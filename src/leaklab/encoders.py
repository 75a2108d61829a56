"""Sentence encoders as attack targets.

Two kinds of access:

- **white-box** (:class:`LocalEncoder`): a local Hugging Face / sentence-transformers encoder with mean (or CLS)
  pooling and optional L2 normalisation; gradients flow from token embeddings to the sentence vector.
- **black-box** (:class:`CallableEncoder`, :class:`HttpEncoder`): any ``embed(texts) -> array``, including an
  OpenAI-style ``POST /v1/embeddings`` endpoint with an API key.

Every encoder counts what it was asked: ``queries`` (texts embedded), ``calls`` (requests) and ``tokens``. The
embedding service serves encoders of the same type (:mod:`leaklab.service.encoders` builds them as
:class:`CallableEncoder` with the model's tokenizer and unit-length output).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaklab.errors import LeaklabError, UnknownNameError

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def rough_token_count(text: str) -> int:
    """Tokens of a text for accounting when the encoder's tokenizer is unknown: words and punctuation marks."""
    return len(_WORD.findall(text))


@dataclass
class Usage:
    """What an attacker spent on an encoder: texts embedded, requests sent, tokens sent, and texts sent again
    after the server asked to retry (429/503)."""

    queries: int = 0
    calls: int = 0
    tokens: int = 0
    retried: int = 0

    def snapshot(self) -> Usage:
        return Usage(self.queries, self.calls, self.tokens, self.retried)

    def since(self, before: Usage) -> dict[str, int]:
        return {
            "queries": self.queries - before.queries,
            "calls": self.calls - before.calls,
            "tokens": self.tokens - before.tokens,
            "retried": self.retried - before.retried,
        }


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms == 0, 1.0, norms)).astype(np.float32)


@dataclass
class Encoder:
    """Base: ``embed(texts)`` counts usage, checks the output and returns float32 (n, dim); one call at a time
    (torch modules and table lookups are not re-entrant across the service's request threads)."""

    name: str
    dim: int
    usage: Usage = field(default_factory=Usage, init=False)
    _lock: Any = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    tokenizer = None  # the encoder's own tokenizer, where known (token counts, searches over its vocabulary)
    max_seq_len = None  # the longest input it reads, in tokens with the special ones, where known

    def _embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text: the encoder's tokenizer (special tokens, no truncation) where known, else words
        and punctuation marks."""
        if self.tokenizer is None:
            return [rough_token_count(t) for t in texts]
        return [len(x) for x in self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(self.token_counts(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            self.usage.queries += len(texts)
            self.usage.calls += 1
            self.usage.tokens += self.count_tokens(texts)
            out = np.asarray(self._embed(texts), dtype=np.float32)
        if out.shape != (len(texts), self.dim):
            raise LeaklabError(f"encoder '{self.name}' returned shape {out.shape}, expected ({len(texts)}, {self.dim})")
        return out

    @property
    def white_box(self) -> bool:
        return False


class CallableEncoder(Encoder):
    """Black-box access through any ``embed(texts) -> array`` callable (in batches of ``batch_size``, or all at
    once when it is None); ``normalize`` scales the output rows to unit length."""

    def __init__(
        self,
        fn: Callable[[list[str]], Any],
        dim: int | None = None,
        name: str = "callable",
        batch_size: int | None = 256,
        tokenizer: Any = None,
        max_seq_len: int | None = None,
        normalize: bool = False,
    ) -> None:
        self._fn = fn
        self._batch = batch_size
        self.tokenizer, self.max_seq_len, self.normalize = tokenizer, max_seq_len, normalize
        if dim is None:
            dim = int(np.asarray(fn(["probe"])).shape[-1])
        super().__init__(name, dim)

    def _embed(self, texts: list[str]) -> np.ndarray:
        step = self._batch or len(texts)
        parts = [np.asarray(self._fn(texts[i : i + step]), dtype=np.float32) for i in range(0, len(texts), step)]
        out = np.concatenate(parts)
        return normalise(out) if self.normalize else out


RETRY_STATUSES = (429, 503)


def retry_after_seconds(value: str | None, attempt: int) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); without one, 1, 2, 4, ... s."""
    if value:
        value = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", value):
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return float(2**attempt)


def print_wait(url: str, status: int, seconds: float, attempt: int, max_retries: int) -> None:
    """The visible wait: one line on stderr per retry."""
    print(
        f"{url} answered {status}; waiting {seconds:.1f}s (Retry-After) before retry {attempt}/{max_retries}",
        file=sys.stderr,
        flush=True,
    )


class HttpEncoder(Encoder):
    """Client of an OpenAI-style embeddings endpoint: POST {base}/v1/embeddings {"model", "input": [..]} with
    ``Authorization: Bearer KEY``; reads ``data[i].embedding`` (ordered by ``index``) and ``usage.prompt_tokens``.

    A 429 or 503 is retried after the server's Retry-After, at most ``max_retries`` times per request and only
    when the wait is at most ``max_wait`` seconds (a daily quota resets at midnight: that is an error, not a
    wait); each wait is reported through ``on_wait`` and the re-sent texts are counted in ``usage.retried``."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str = "minilm-l6",
        dim: int | None = None,
        batch_size: int = 64,
        timeout: float = 60.0,
        client: Any = None,
        max_retries: int = 5,
        max_wait: float = 120.0,
        on_wait: Callable[[str, int, float, int, int], None] = print_wait,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx

        self.max_retries, self.max_wait, self.on_wait, self._sleep = max_retries, max_wait, on_wait, sleep
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1/embeddings"):
            self.url += "/v1/embeddings"
        self.model = model
        self._batch = batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout, headers=headers)
        if client is not None and api_key:
            self._client.headers.update(headers)
        self._server_tokens = 0
        super().__init__(f"http:{model}", dim or 0)
        if dim is None:
            self.dim = int(self._post(["probe"]).shape[1])

    def _send(self, texts: list[str]) -> Any:
        import httpx

        try:
            return self._client.post(self.url, json={"model": self.model, "input": texts})
        except httpx.HTTPError as exc:
            raise LeaklabError(f"embedding endpoint {self.url} unreachable: {exc}") from None

    def _post(self, texts: list[str]) -> np.ndarray:
        resp = self._send(texts)
        attempt = 0
        while resp.status_code in RETRY_STATUSES and attempt < self.max_retries:
            wait = retry_after_seconds(resp.headers.get("retry-after"), attempt)
            if wait > self.max_wait:
                raise LeaklabError(
                    f"embedding endpoint {self.url} answered {resp.status_code} with Retry-After {wait:.0f}s, "
                    f"longer than the {self.max_wait:g}s this client waits: {resp.text[:200]}"
                )
            attempt += 1
            self.on_wait(self.url, resp.status_code, wait, attempt, self.max_retries)
            self._sleep(wait)
            self.usage.retried += len(texts)
            resp = self._send(texts)
        if resp.status_code != 200:
            raise LeaklabError(f"embedding endpoint {self.url} answered {resp.status_code}: {resp.text[:200]}")
        body = resp.json()
        rows = sorted(body.get("data", []), key=lambda d: d.get("index", 0))
        if len(rows) != len(texts):
            raise LeaklabError(f"embedding endpoint returned {len(rows)} vectors for {len(texts)} texts")
        self._server_tokens = int((body.get("usage") or {}).get("prompt_tokens", 0))
        return np.asarray([r["embedding"] for r in rows], dtype=np.float32)

    def _embed(self, texts: list[str]) -> np.ndarray:
        parts, server_tokens = [], 0
        for i in range(0, len(texts), self._batch):
            parts.append(self._post(texts[i : i + self._batch]))
            server_tokens += self._server_tokens
        if server_tokens:  # the server's own count replaces the rough one
            self.usage.tokens += server_tokens - self.count_tokens(texts)
        self.usage.calls += max(0, (len(texts) - 1) // self._batch)
        return np.concatenate(parts)


class LocalEncoder(Encoder):
    """White-box transformer encoder: pool(last hidden states) then optional L2 normalisation.

    e(x) = normalise(Σ_t m_t h_t / Σ_t m_t) for mean pooling (h: last layer, m: attention mask)."""

    def __init__(
        self,
        name: str,
        backbone: torch.nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 128,
        batch_size: int = 64,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise UnknownNameError("pooling", pooling, ["mean", "cls"])
        from leaklab.models.device import current_device

        self.backbone = backbone.to(current_device()).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self._batch = batch_size
        super().__init__(name, int(backbone.config.hidden_size))

    @property
    def white_box(self) -> bool:
        return True

    @property
    def max_seq_len(self) -> int:
        return self.max_length

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the encoder reads it (special tokens, truncated at ``max_length``)."""
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length)
        return [len(x) for x in ids["input_ids"]]

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            v = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            v = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(v, dim=-1) if self.normalize else v

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.device

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors from token input embeddings (B, T, d) — differentiable (white-box attacks)."""
        attention_mask = attention_mask.to(inputs_embeds.device)
        out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return self.pool(out.last_hidden_state, attention_mask)

    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.pool(out.last_hidden_state, attention_mask)

    def _embed(self, texts: list[str]) -> np.ndarray:
        parts = []
        with torch.no_grad():
            for i in range(0, len(texts), self._batch):
                enc = self.tokenizer(
                    texts[i : i + self._batch],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                parts.append(self.forward_ids(enc["input_ids"], enc["attention_mask"]).cpu().numpy())
        return np.concatenate(parts)

    def embed_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed token-id sequences (special tokens added here), counted like texts."""
        self.usage.queries += len(ids)
        self.usage.calls += 1
        self.usage.tokens += sum(len(x) + 2 for x in ids)
        cls_id, sep_id, pad_id = (
            self.tokenizer.cls_token_id,
            self.tokenizer.sep_token_id,
            self.tokenizer.pad_token_id,
        )
        rows = [[cls_id, *list(x)[: self.max_length - 2], sep_id] for x in ids]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            return self.forward_ids(input_ids, mask).cpu().numpy()


# ----------------------------------------------------------------------------- registry of local encoders
def _minilm(**kw: Any) -> LocalEncoder:
    from leaklab.models.registry import minilm_dir

    return _from_folder(str(minilm_dir()), name="minilm-l6", **kw)


def _tiny(**kw: Any) -> LocalEncoder:
    """A 2-layer random BERT (d=128, MiniLM WordPiece) with mean pooling + L2 normalisation, for fast tests."""
    from leaklab.models import load_model

    loaded = load_model("tiny-bert", task="classify", init_seed=kw.pop("init_seed", 0))
    import copy

    backbone = copy.deepcopy(loaded.model.bert)
    return LocalEncoder("tiny-bert", backbone, loaded.tokenizer, **kw)


def _from_folder(folder: str, name: str | None = None, **kw: Any) -> LocalEncoder:
    """Any Hugging Face encoder folder; a sentence-transformers folder also sets pooling and normalisation."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(os.path.expanduser(folder))
    pooling, normalize = "mean", True
    modules = path / "modules.json"
    if modules.exists():
        mods = json.loads(modules.read_text())
        normalize = any("Normalize" in m.get("type", "") for m in mods)
        pool_cfg = path / "1_Pooling" / "config.json"
        if pool_cfg.exists():
            cfg = json.loads(pool_cfg.read_text())
            pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise LeaklabError(f"'{folder}' is not a loadable encoder folder: {exc}") from None
    kw.setdefault("pooling", pooling)
    kw.setdefault("normalize", normalize)
    return LocalEncoder(name or path.name, model, tok, **kw)


LOCAL_ENCODERS: dict[str, Callable[..., LocalEncoder]] = {"minilm-l6": _minilm, "tiny-bert": _tiny}
_CACHE: dict[str, LocalEncoder] = {}


def load_encoder(spec: str, api_key: str | None = None, fresh: bool = False, **kw: Any) -> Encoder:
    """``minilm-l6`` | ``tiny-bert`` | an encoder folder | ``http(s)://host[:port][#model]`` (OpenAI-style
    endpoint; ``#model`` names the model the requests ask for, default ``minilm-l6``).

    Local encoders are memoised (usage counters are per call site: use ``usage.snapshot``/``since``);
    ``fresh=True`` builds a new one."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if model:
            kw.setdefault("model", model)
        return HttpEncoder(url, api_key=api_key or os.environ.get("LEAKLAB_API_KEY"), **kw)
    if not fresh and not kw and spec in _CACHE:
        return _CACHE[spec]
    if spec in LOCAL_ENCODERS:
        enc = LOCAL_ENCODERS[spec](**kw)
    elif os.path.isdir(os.path.expanduser(spec)):
        enc = _from_folder(spec, **kw)
    else:
        raise UnknownNameError("encoder", spec, list(LOCAL_ENCODERS), "or an encoder folder or http(s):// URL")
    if not fresh and not kw:
        _CACHE[spec] = enc
    return enc


def require_local(encoder: Encoder, attack: str) -> LocalEncoder:
    if not isinstance(encoder, LocalEncoder):
        raise LeaklabError(f"attack '{attack}' needs white-box access (a local encoder), got '{encoder.name}'")
    return encoder


# ----------------------------------------------------------------------------- checks and caching
def check_vectors(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate leaked vectors: 2-D, matching the encoder's dimension, finite, non-empty."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise LeaklabError(f"{what}: expected a non-empty (n, {dim}) array, got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise LeaklabError(f"{what}: dimension {arr.shape[1]} does not match the encoder's dimension {dim}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise LeaklabError(f"{what}: {int(bad.sum())} vector(s) contain NaN or inf (first at row {int(bad.argmax())})")
    return arr


def check_texts(texts: Sequence[str], what: str = "corpus") -> list[str]:
    out = [t for t in texts if t and t.strip()]
    if not out:
        raise LeaklabError(f"{what} is empty: give at least one non-empty text")
    return out


def cached_embed(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    """Embed with a disk cache keyed by local encoder name and texts; usage is counted as if embedded."""
    from leaklab.io import atomic_write, cache_dir

    texts = list(texts)
    key = hashlib.sha256(("\x00".join([encoder.name, *texts])).encode()).hexdigest()[:24]
    path = cache_dir() / "embeddings" / f"{encoder.name.replace('/', '_')}-{key}.npy"
    if path.exists() and not isinstance(encoder, HttpEncoder | CallableEncoder):
        arr = np.load(path)
        if arr.shape == (len(texts), encoder.dim):  # a cache hit still costs the attacker these queries
            encoder.usage.queries += len(texts)
            encoder.usage.calls += 1
            encoder.usage.tokens += encoder.count_tokens(texts)
            return arr
    arr = encoder.embed(texts)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    atomic_write(path, write)
    return arr


class TransformedEncoder(Encoder):
    """Black-box view of another encoder behind a secret linear map: e'(x) = e(x) M (+ Gaussian noise σ)."""

    def __init__(
        self, base: Encoder, matrix: np.ndarray, noise: float = 0.0, seed: int = 0, name: str | None = None
    ) -> None:
        if matrix.shape[0] != base.dim:
            raise LeaklabError(f"transform has {matrix.shape[0]} rows, the encoder has dimension {base.dim}")
        self.base, self.matrix, self.noise = base, matrix.astype(np.float32), noise
        self._rng = np.random.default_rng(seed)
        super().__init__(name or f"{base.name}+transform", int(matrix.shape[1]))

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = cached_embed(self.base, texts) @ self.matrix
        if self.noise:
            out = out + self.noise * self._rng.standard_normal(out.shape).astype(np.float32)
        return out


def random_rotation(dim: int, seed: int) -> np.ndarray:
    """A Haar-random rotation of R^dim (scipy special_ortho_group)."""
    from scipy.stats import special_ortho_group

    return special_ortho_group.rvs(dim, random_state=seed).astype(np.float32)


def check_pairs(texts: Sequence[str], vectors: Any, dim: int) -> tuple[list[str], np.ndarray]:
    """Training pairs: non-empty texts, finite ``dim``-wide vectors, one vector per text."""
    texts = check_texts(texts, "training corpus")
    vecs = check_vectors(vectors, dim, "training vectors")
    if len(texts) != len(vecs):
        raise LeaklabError(f"{len(texts)} training texts but {len(vecs)} vectors")
    return texts, vecs
