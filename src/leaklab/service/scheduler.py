"""Fair sharing of the encoder between API keys.

Two levels: admission (at most ``max_concurrent`` requests of one key in flight; later ones wait in that key's
FIFO queue, without holding a worker thread, until a deadline, then :class:`Busy`), and encoder turns handed
round-robin across keys, one chunk of texts per turn, so a large request of one key delays another key's
small request by at most one chunk per key ahead of it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

POLL_S = 0.005


class Busy(Exception):
    """The request waited ``waited`` seconds for its key's turn; the client should retry after ``retry_after``."""

    def __init__(self, waited: float, retry_after: float) -> None:
        super().__init__(f"waited {waited:.1f}s for a slot")
        self.waited, self.retry_after = waited, retry_after


class FairScheduler:
    def __init__(self, queue_timeout_s: float) -> None:
        self.queue_timeout_s = queue_timeout_s
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._queued: dict[str, deque[object]] = {}
        self._cv = threading.Condition()
        self._waiting: OrderedDict[str, deque[object]] = OrderedDict()
        self._holder: object | None = None

    # ------------------------------------------------------------------ admission (event loop side)
    def _try_admit(self, key_id: str, ticket: object, limit: int) -> bool:
        with self._lock:
            queue = self._queued[key_id]
            if queue[0] is ticket and self._in_flight.get(key_id, 0) < limit:
                queue.popleft()
                self._in_flight[key_id] = self._in_flight.get(key_id, 0) + 1
                return True
            return False

    def _leave_queue(self, key_id: str, ticket: object) -> None:
        with self._lock:
            queue = self._queued[key_id]
            queue.remove(ticket)
            if not queue:
                del self._queued[key_id]

    def _release(self, key_id: str) -> None:
        with self._lock:
            self._in_flight[key_id] -= 1
            if not self._in_flight[key_id]:
                del self._in_flight[key_id]
            if key_id in self._queued and not self._queued[key_id]:
                del self._queued[key_id]

    @asynccontextmanager
    async def admit(self, key_id: str, limit: int) -> AsyncIterator[None]:
        """Hold one of the key's ``limit`` slots; raise :class:`Busy` after ``queue_timeout_s`` in its queue."""
        ticket = object()
        with self._lock:
            self._queued.setdefault(key_id, deque()).append(ticket)
        start = time.monotonic()
        while not self._try_admit(key_id, ticket, limit):
            waited = time.monotonic() - start
            if waited >= self.queue_timeout_s:
                self._leave_queue(key_id, ticket)
                raise Busy(waited, self.queue_timeout_s)
            await asyncio.sleep(POLL_S)
        try:
            yield
        finally:
            self._release(key_id)

    def in_flight(self, key_id: str) -> int:
        with self._lock:
            return self._in_flight.get(key_id, 0)

    # ------------------------------------------------------------------ encoder turns (worker threads)
    def _grant_next(self) -> None:
        if self._holder is not None or not self._waiting:
            return
        key_id, queue = next(iter(self._waiting.items()))
        self._holder = queue.popleft()
        if queue:
            self._waiting.move_to_end(key_id)
        else:
            del self._waiting[key_id]
        self._cv.notify_all()

    @contextmanager
    def turn(self, key_id: str) -> Iterator[None]:
        """Exclusive use of the encoder for one chunk; keys take turns in round-robin order."""
        ticket = object()
        with self._cv:
            self._waiting.setdefault(key_id, deque()).append(ticket)
            self._grant_next()
            while self._holder is not ticket:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._holder = None
                self._grant_next()
