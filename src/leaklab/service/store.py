"""SQLite store of the service (WAL): API keys (hashed), the per-query log, daily usage and monitor flags.

Every write commits before the HTTP response is sent. WAL with ``synchronous=NORMAL`` keeps every committed
transaction across a process crash (SIGKILL); ``durability: full`` also survives power loss (fsync per
commit).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from leaklab.errors import LeaklabError
from leaklab.service.monitor import MonitorState

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, key_id TEXT NOT NULL, ts REAL NOT NULL,
    route TEXT NOT NULL, text_hash TEXT NOT NULL, tokens INTEGER NOT NULL, vector_hash TEXT NOT NULL,
    defense TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS queries_key ON queries(key_id, ts);
CREATE INDEX IF NOT EXISTS queries_request ON queries(request_id);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, day));
CREATE TABLE IF NOT EXISTS flags (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key_id TEXT NOT NULL, ts REAL NOT NULL, score REAL NOT NULL,
    action TEXT NOT NULL, evidence TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_state (
    key_id TEXT PRIMARY KEY, count INTEGER NOT NULL, score REAL NOT NULL, flagged INTEGER NOT NULL,
    last_flag_at INTEGER NOT NULL, action TEXT, updated REAL NOT NULL);
"""
KEY_PREFIX = "lk-"


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    tenant: str
    created: float
    revoked: float | None


@dataclass(frozen=True)
class LogRow:
    text_hash: str
    tokens: int
    vector_hash: str


def hash_key(secret: str) -> str:
    """SHA-256 of the full key; keys carry 192 random bits, so a fast hash is not brute-forceable."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class Store:
    """Thread-safe wrapper over one SQLite connection (the service writes from its request threads)."""

    def __init__(self, path: str | Path, durability: str = "normal") -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise LeaklabError(f"database folder {self.path.parent} does not exist")
        try:
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LeaklabError(f"{self.path}: not a leaklab service database ({exc})") from exc
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str, tenant: str | None = None) -> tuple[KeyRecord, str]:
        """A new key; returns the record and the secret (shown once, only its hash is stored)."""
        if not name or len(name) > 64:
            raise LeaklabError("key name must be 1..64 characters")
        key_id = secrets.token_hex(4)
        secret = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(24)}"
        rec = KeyRecord(key_id, name, tenant or name, time.time(), None)
        with self.lock:
            try:
                self.conn.execute(
                    "INSERT INTO keys VALUES (?,?,?,?,?,NULL)",
                    (rec.id, rec.name, rec.tenant, hash_key(secret), rec.created),
                )
            except sqlite3.IntegrityError as exc:
                raise LeaklabError(f"a key named '{name}' already exists (names are unique)") from exc
        return rec, secret

    def list_keys(self) -> list[KeyRecord]:
        with self.lock:
            rows = self.conn.execute("SELECT id, name, tenant, created, revoked FROM keys ORDER BY created").fetchall()
        return [KeyRecord(*r) for r in rows]

    def revoke_key(self, ident: str) -> KeyRecord:
        """Revoke by id or name; revoking twice is an error that says so."""
        with self.lock:
            row = self.conn.execute(
                "SELECT id, name, tenant, created, revoked FROM keys WHERE id=? OR name=?", (ident, ident)
            ).fetchone()
            if row is None:
                raise LeaklabError(f"no key with id or name '{ident}'")
            if row[4] is not None:
                raise LeaklabError(f"key '{ident}' is already revoked")
            now = time.time()
            self.conn.execute("UPDATE keys SET revoked=? WHERE id=?", (now, row[0]))
        return KeyRecord(row[0], row[1], row[2], row[3], now)

    def authenticate(self, secret: str) -> KeyRecord | None:
        """The active key whose hash matches ``secret``, else None."""
        with self.lock:
            row = self.conn.execute(
                "SELECT id, name, tenant, created, revoked FROM keys WHERE hash=?", (hash_key(secret),)
            ).fetchone()
        if row is None or row[4] is not None:
            return None
        return KeyRecord(*row)

    # ------------------------------------------------------------------ quota + log
    def usage(self, key_id: str, day: str) -> tuple[int, int]:
        with self.lock:
            row = self.conn.execute(
                "SELECT requests, tokens FROM usage WHERE key_id=? AND day=?", (key_id, day)
            ).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def admit_and_log(
        self,
        key_id: str,
        route: str,
        rows: list[LogRow],
        defense: str,
        daily_requests: int,
        daily_tokens: int,
        now: float | None = None,
        monitor: MonitorState | None = None,
    ) -> str | None:
        """Atomically: if the request fits today's quotas, log its rows, count it and save the key's monitor
        state; returns the request id, or None when the quota would be exceeded (nothing is written)."""
        now = time.time() if now is None else now
        day = utc_day(now)
        tokens = sum(r.tokens for r in rows)
        request_id = secrets.token_hex(8)
        with self.lock:
            used = self.conn.execute(
                "SELECT requests, tokens FROM usage WHERE key_id=? AND day=?", (key_id, day)
            ).fetchone() or (0, 0)
            if (daily_requests and used[0] + 1 > daily_requests) or (daily_tokens and used[1] + tokens > daily_tokens):
                return None
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany(
                    "INSERT INTO queries (request_id, key_id, ts, route, text_hash, tokens, vector_hash,"
                    " defense)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    [(request_id, key_id, now, route, r.text_hash, r.tokens, r.vector_hash, defense) for r in rows],
                )
                self.conn.execute(
                    "INSERT INTO usage VALUES (?,?,1,?) ON CONFLICT(key_id, day) DO UPDATE SET "
                    "requests=requests+1, tokens=tokens+excluded.tokens",
                    (key_id, day, tokens),
                )
                if monitor is not None:
                    self._save_monitor(monitor, now)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return request_id

    def _save_monitor(self, st: MonitorState, now: float) -> None:
        self.conn.execute(
            "INSERT INTO monitor_state VALUES (?,?,?,?,?,?,?) ON CONFLICT(key_id) DO UPDATE SET count=excluded.count,"
            " score=excluded.score, flagged=excluded.flagged, last_flag_at=excluded.last_flag_at,"
            " action=excluded.action, updated=excluded.updated",
            (st.key_id, st.count, st.score, int(st.flagged), st.last_flag_at, st.action, now),
        )

    def monitor_states(self) -> list[MonitorState]:
        """Per-key monitor state as last saved; a key with a flag row but no saved state (a database written
        before states were saved) comes back flagged with the action of its latest flag."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT key_id, count, score, flagged, last_flag_at, action FROM monitor_state"
            ).fetchall()
            flags = self.conn.execute(
                "SELECT key_id, score, action FROM flags f WHERE id = (SELECT MAX(id) FROM flags WHERE key_id=f.key_id)"
            ).fetchall()
        out = {r[0]: MonitorState(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows}
        for key_id, score, action in flags:
            st = out.get(key_id)
            if st is None or not st.flagged:
                out[key_id] = MonitorState(key_id, st.count if st else 0, score, True, st.count if st else 0, action)
        return list(out.values())

    def add_flag(self, key_id: str, score: float, action: str, evidence: dict) -> None:
        with self.lock:
            self.conn.execute(
                "INSERT INTO flags (key_id, ts, score, action, evidence) VALUES (?,?,?,?,?)",
                (key_id, time.time(), score, action, json.dumps(evidence, sort_keys=True)),
            )

    def flags(self) -> list[dict]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT f.key_id, k.name, f.ts, f.score, f.action, f.evidence FROM flags f "
                "LEFT JOIN keys k ON k.id = f.key_id ORDER BY f.ts"
            ).fetchall()
        return [
            {
                "key_id": r[0],
                "name": r[1],
                "ts": r[2],
                "score": r[3],
                "action": r[4],
                "evidence": json.loads(r[5]),
            }
            for r in rows
        ]

    def query_rows(self, request_id: str | None = None) -> list[dict]:
        sql = "SELECT request_id, key_id, ts, route, text_hash, tokens, vector_hash, defense FROM queries"
        args: tuple = ()
        if request_id:
            sql += " WHERE request_id=?"
            args = (request_id,)
        with self.lock:
            rows = self.conn.execute(sql, args).fetchall()
        cols = ("request_id", "key_id", "ts", "route", "text_hash", "tokens", "vector_hash", "defense")
        return [dict(zip(cols, r, strict=True)) for r in rows]
