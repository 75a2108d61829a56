"""Per-key token buckets (requests per second with a burst), in memory; daily quotas live in the store."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token bucket per key: refill ``rate``·Δt up to ``burst``; a request costs 1 token."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str, rate: float, burst: int, now: float | None = None) -> float:
        """0.0 when admitted (one token taken), else the seconds until a token is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            b = self._buckets.get(key_id)
            if b is None:
                b = self._buckets[key_id] = Bucket(float(burst), now)
            b.tokens = min(float(burst), b.tokens + (now - b.updated) * rate)
            b.updated = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / rate


def retry_after(seconds: float) -> str:
    """Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
