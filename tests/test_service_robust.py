"""Issue 23, service side, against real servers on 127.0.0.1: no 5xx under hostile bodies (one error shape),
body-size limit before reading, fair sharing between keys, monitor state across a restart, client retries."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leaklab.errors import LeaklabError
from leaklab.service.process import ServerProcess, write_config
from leaklab.service.store import Store

MB = 1_000_000


def _keys(db, *names):
    store = Store(db)
    out = {n: store.create_key(n)[1] for n in names}
    store.close()
    return out


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _is_error_shape(resp: httpx.Response) -> bool:
    err = resp.json().get("error")
    return isinstance(err, dict) and {"message", "type", "param"} <= set(err) and isinstance(err["message"], str)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    db = tmp / "svc.db"
    keys = _keys(db, "alice", "slow")
    cfg = write_config(
        tmp / "cfg.json",
        {
            "search": {"corpus": "chatterbot:english", "limit": 100},
            "limits": {"rate": 1000, "burst": 1000, "max_request_tokens": 4000},
            "defenses": [{"kind": "gaussian", "epsilon": 500, "delta": 1e-5}],
            "keys": {"slow": {"limits": {"rate": 1, "burst": 1}}},
        },
    )
    with ServerProcess("hashing", db, cfg) as srv:
        yield srv, keys


# ---------------------------------------------------------------------------------------------- fuzzing

SURROGATES = st.sampled_from(["abc \ud800", "\udfff", "x\ud83d", "\ud800\udc00"])  # the last one: a valid pair
HOSTILE = st.one_of(
    st.sampled_from(["hello world", ["one text", "two texts"], 3, "float"]),  # valid values, so some pass
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400, -(10**30), 0, -1, True, None]),
    st.text(st.characters(codec=None), max_size=30),  # any code point, surrogates included
    SURROGATES,
    st.sampled_from(["", " ", "\x00", "a" * 20_001, "word " * 3_000]),
    st.lists(st.one_of(st.text(max_size=10), SURROGATES, st.floats()), max_size=300),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
BODIES = st.one_of(
    st.fixed_dictionaries(
        {"input": HOSTILE},
        optional={"model": HOSTILE, "dimensions": HOSTILE, "encoding_format": HOSTILE, "user": HOSTILE},
    ),
    st.fixed_dictionaries({"query": HOSTILE}, optional={"top_k": HOSTILE}),
    HOSTILE,
)


def test_hostile_bodies_get_4xx_in_one_shape_never_5xx(server):
    """120 raw JSON bodies with NaN/Infinity, unpaired surrogates (\\ud800 escapes), huge and empty values, wrong types:
    every answer is 200 or a 4xx in the one error shape."""
    srv, keys = server
    seen: list[int] = []
    with httpx.Client(base_url=srv.url, timeout=30) as c:

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=BODIES, route=st.sampled_from(["/v1/embeddings", "/v1/search"]))
        def run(body, route):
            raw = json.dumps(body, allow_nan=True)  # NaN/Infinity literals; surrogates as \\udXXX escapes
            r = c.post(route, content=raw, headers={**_auth(keys["alice"]), "Content-Type": "application/json"})
            seen.append(r.status_code)
            assert r.status_code < 500, (raw[:300], r.text[:300])
            if r.status_code >= 400:
                assert _is_error_shape(r), r.text[:300]

        run()
        raw_values = ('"abc \\ud800"', '["ok", "\\udfff"]', "NaN", "Infinity", "-Infinity")
        for value in raw_values:  # an unpaired surrogate or a non-finite number: refused at validation
            for route, field in (("/v1/embeddings", "input"), ("/v1/search", "query")):
                raw = f'{{"{field}": {value}}}'
                r = c.post(route, content=raw, headers={**_auth(keys["alice"]), "Content-Type": "application/json"})
                assert r.status_code == 400 and r.json()["error"]["param"] == field, (raw, r.text)
        for raw in ('{"input": "x", "dimensions": NaN}', '{"query": "x", "top_k": -Infinity}'):
            r = c.post("/v1/search" if "query" in raw else "/v1/embeddings", content=raw, headers=_auth(keys["alice"]))
            assert r.status_code == 400 and _is_error_shape(r), r.text
        no_type = c.post("/v1/embeddings", content='{"input": "hi"}', headers=_auth(keys["alice"]))
        assert no_type.status_code == 400 and "Content-Type: application/json" in no_type.json()["error"]["message"]
        assert c.get("/v1/nothing", headers=_auth(keys["alice"])).json()["error"]["type"] == "invalid_request_error"
    assert seen.count(200) >= 1 and len(seen) >= 120


def test_schemathesis_openapi_no_5xx_and_one_error_shape(server):
    import schemathesis

    srv, keys = server
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    seen: list[int] = []
    for op in ("/v1/embeddings", "/v1/search"):
        strategy = schema[op]["POST"].as_strategy()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def run(case):
            resp = case.call(base_url=srv.url, headers=_auth(keys["alice"]), timeout=30)
            seen.append(resp.status_code)
            assert resp.status_code < 500, (case.body, resp.text)
            if resp.status_code >= 400:
                assert _is_error_shape(resp), resp.text

        run()
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)


# ---------------------------------------------------------------------------------------------- body limit


def _raw_post(url: str, headers: dict[str, str], send_bytes: int, chunked: bool = False) -> tuple[bytes, float, int]:
    """POST announcing 64 MB (or streaming it chunked) but sending only what the server accepts before it
    answers; returns (response head, seconds to the answer, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    head = ["POST /v1/embeddings HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {64 * 2**20}"]
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        s.settimeout(0.05)
        block = b'{"input": "' + b"a" * (64 * 1024)
        answer = b""
        while sent < send_bytes and not answer:
            try:
                s.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block)
                sent += len(block)
            except OSError:  # the server closed its side after answering
                break
            with contextlib.suppress(TimeoutError):
                answer = s.recv(4096)
        s.settimeout(10)
        while b"\r\n\r\n" not in answer:
            more = s.recv(4096)
            if not more:
                break
            answer += more
        return answer, time.monotonic() - t0, sent


def test_64mb_body_is_refused_before_it_is_read(server):
    """A declared 64 MB body: 413 with a key, 401 without one, answered at once, after the client has sent
    at most a few hundred kB (the server never waits for, reads or parses the rest); a chunked body without a
    length is cut at the 2 MB limit."""
    srv, keys = server
    answer, seconds, sent = _raw_post(srv.url, _auth(keys["alice"]), 64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer[:300]
    assert seconds < 2.0 and sent <= 512 * 1024, (seconds, sent)
    answer, seconds, sent = _raw_post(srv.url, {}, 64 * 2**20)
    assert answer.startswith(b"HTTP/1.1 401") and seconds < 2.0 and sent <= 512 * 1024, (answer[:200], seconds, sent)
    answer, seconds, sent = _raw_post(srv.url, _auth(keys["alice"]), 64 * 2**20, chunked=True)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert 2 * MB <= sent <= 12 * MB and seconds < 5.0, (sent, seconds)  # read up to the limit, then refused
    with httpx.Client(base_url=srv.url, timeout=30) as c:  # the server still serves
        assert c.post("/v1/embeddings", json={"input": "still here"}, headers=_auth(keys["alice"])).status_code == 200
        over = c.post("/v1/embeddings", json={"input": ["many words here"] * 300}, headers=_auth(keys["alice"]))
        assert over.status_code == 400 and over.json()["error"]["param"] == "input"  # max_inputs 256
        budget = c.post("/v1/embeddings", json={"input": ["one two three " * 100] * 20}, headers=_auth(keys["alice"]))
        assert budget.status_code == 413 and "at most 4000" in budget.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- client retries


def test_http_encoder_waits_out_429_retry_after(server):
    """The leaklab service limits key 'slow' to 1 request/s (burst 1): the black-box client waits out each 429
    Retry-After (reported), counts the re-sent texts, and still returns every vector; with no retries left, or
    a Retry-After longer than it waits, it stops with one clear error."""
    from leaklab.encoders import HttpEncoder

    srv, keys = server
    waits: list[tuple[int, float]] = []
    enc = HttpEncoder(
        srv.url,
        api_key=keys["slow"],
        model="hashing",
        batch_size=1,
        on_wait=lambda url, status, s, attempt, most: waits.append((status, s)),
    )
    t0 = time.monotonic()
    vecs = enc.embed(["first text", "second text", "third text"])
    elapsed = time.monotonic() - t0
    assert vecs.shape == (3, 128) and np.all(np.isfinite(vecs))
    assert waits and all(status == 429 and s >= 1 for status, s in waits)
    assert enc.usage.retried == len(waits) and elapsed >= 1.0
    eager = HttpEncoder(srv.url, api_key=keys["slow"], model="hashing", dim=128, max_retries=0)
    with pytest.raises(LeaklabError, match="429"):
        for _ in range(3):
            eager.embed(["again"])
    impatient = HttpEncoder(srv.url, api_key=keys["slow"], model="hashing", dim=128, max_wait=0.1)
    with pytest.raises(LeaklabError, match=r"longer than the 0\.1s"):
        for _ in range(3):
            impatient.embed(["again"])


# ---------------------------------------------------------------------------------------------- restart


def test_flagged_key_stays_mitigated_after_restart(tmp_path):
    """A padded probe (each edit-chain probe followed by three natural sentences, 120 queries) is flagged live
    and gets escalated noise; after the server process is stopped and started on the same SQLite file, the key
    is still flagged and its responses still carry the escalation; a benign key's do not."""
    from leaklab.service.encoders import load_encoder
    from leaklab.service.traffic import benign, load_pools, padded_edit_chain

    db = tmp_path / "svc.db"
    keys = _keys(db, "probe", "user")
    monitor = {"action": "noise", "noise_epsilon": 20}
    cfg = write_config(tmp_path / "cfg.json", {"limits": {"rate": 1000, "burst": 1000}, "monitor": monitor})
    pools = load_pools()
    rng = np.random.default_rng(5)
    attack = padded_edit_chain(load_encoder("hashing"), pools, rng, 120, pad=3)
    normal = benign("reviews", pools, rng, 40)
    with ServerProcess("hashing", db, cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for text in attack:
            assert c.post("/v1/embeddings", json={"input": text}, headers=_auth(keys["probe"])).status_code == 200
        for text in normal:
            assert c.post("/v1/embeddings", json={"input": text}, headers=_auth(keys["user"])).status_code == 200
    store = Store(db)
    states = {s.key_id: s for s in store.monitor_states()}
    probe_id, user_id = keys["probe"].split("-")[1], keys["user"].split("-")[1]
    assert states[probe_id].flagged and states[probe_id].action == "noise" and not states[user_id].flagged
    flags_before = len(store.flags())
    store.close()
    with ServerProcess("hashing", db, cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        after = {}
        for name in ("probe", "user"):
            r = c.post(
                "/v1/embeddings", json={"input": "a plain sentence about the weather"}, headers=_auth(keys[name])
            )
            assert r.status_code == 200
            after[name] = r.headers["x-request-id"]
    store = Store(db)
    defense = {n: store.query_rows(rid)[0]["defense"] for n, rid in after.items()}
    assert "gaussian(eps=20" in defense["probe"] and "gaussian(eps=20" not in defense["user"], defense
    assert len(store.flags()) == flags_before  # restored, not re-flagged
    store.close()


# ---------------------------------------------------------------------------------------------- fairness


@pytest.mark.real
def test_one_key_cannot_starve_another(tmp_path):
    """MiniLM on CPU. Key 'big' sends three maximal requests at once (128 texts of 2,000 characters: 128 × 256
    tokens through the encoder, ~4 s on a quiet 2-core machine) with at most one in flight per key; while the
    first runs, key 'small' sends one-line requests. Bound: each small request completes in under a third of the
    big request's time (without turns it waited for the whole big request), their median in under 2 s; the big
    key's surplus requests wait in its own queue and get 503 + Retry-After at the 1 s deadline instead of
    occupying the server. (The big request must outlast the deadline by a wide margin: at 64 texts and a 2 s
    deadline a quiet CI machine finished it in 1.93 s and let the third request in.)"""
    db = tmp_path / "svc.db"
    keys = _keys(db, "big", "small")
    limits = {"rate": 100, "burst": 100, "max_inputs": 128, "max_chars": 2000, "max_concurrent": 1}
    limits["max_request_tokens"] = 100_000
    server_cfg = {"encode_chunk": 4, "queue_timeout_s": 1.0}
    cfg = write_config(tmp_path / "cfg.json", {"limits": limits, "server": server_cfg, "monitor": {"enabled": False}})
    rng = np.random.default_rng(0)
    words = ["alpha", "river", "stone", "light", "paper", "cloud", "green", "music", "table", "quiet"]
    big_body = {"input": [" ".join(rng.choice(words, 330))[:2000] for _ in range(128)]}
    big: list[tuple[int, float, str | None]] = []

    def send_big(c: httpx.Client) -> None:
        t0 = time.monotonic()
        r = c.post("/v1/embeddings", json=big_body, headers=_auth(keys["big"]))
        big.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after")))

    with ServerProcess("minilm-l6", db, cfg) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        assert c.post("/v1/embeddings", json={"input": "warm up"}, headers=_auth(keys["small"])).status_code == 200
        threads = [threading.Thread(target=send_big, args=(c,)) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        small = []
        while any(t.is_alive() for t in threads) and len(small) < 5:
            t0 = time.monotonic()
            r = c.post("/v1/embeddings", json={"input": "is it raining today?"}, headers=_auth(keys["small"]))
            assert r.status_code == 200
            small.append(time.monotonic() - t0)
        for t in threads:
            t.join()
    done = [b for b in big if b[0] == 200]
    busy = [b for b in big if b[0] == 503]
    assert len(done) == 1 and len(busy) == 2 and all(b[2] for b in busy), big
    assert all(b[1] < done[0][1] for b in busy), big  # turned away at the deadline, not after the first finished
    assert len(small) >= 3 and np.median(small) < 2.0 and max(small) < done[0][1] / 3, (small, done)


def test_encoder_turns_alternate_between_keys():
    """Round-robin turns: key B, arriving while key A works through 8 chunks, runs after at most one more of
    A's chunks, and A's later chunks alternate with B's."""
    from leaklab.service.scheduler import FairScheduler

    sched = FairScheduler(queue_timeout_s=1.0)
    order: list[str] = []
    started = threading.Event()

    def work(key: str, chunks: int) -> None:
        for _ in range(chunks):
            with sched.turn(key):
                order.append(key)
                started.set()
                time.sleep(0.02)

    a = threading.Thread(target=work, args=("A", 8))
    a.start()
    started.wait()
    b = threading.Thread(target=work, args=("B", 3))
    b.start()
    a.join()
    b.join()
    first_b = order.index("B")
    assert first_b <= 2, order
    assert order[first_b : first_b + 6] in (["B", "A"] * 3, ["A", "B"] * 3), order


def test_admission_queue_deadline_gives_busy():
    import asyncio

    from leaklab.service.scheduler import Busy, FairScheduler

    sched = FairScheduler(queue_timeout_s=0.2)

    async def go() -> list[str]:
        out: list[str] = []

        async def one(key: str, hold: float) -> None:
            try:
                async with sched.admit(key, 1):
                    await asyncio.sleep(hold)
                    out.append(f"{key}:ok")
            except Busy as exc:
                assert exc.waited >= 0.2
                out.append(f"{key}:busy")

        await asyncio.gather(one("A", 0.5), one("A", 0.0), one("B", 0.0))
        return out

    out = asyncio.run(go())
    assert sorted(out) == ["A:busy", "A:ok", "B:ok"] and out[0] == "B:ok"
    assert sched.in_flight("A") == 0


def test_monitor_state_round_trips_through_the_store(tmp_path):
    """Saved with the request's log rows and restored into a fresh monitor; a key with only a flag row (a
    database from before states were saved) comes back flagged with that flag's action."""
    from leaklab.service.monitor import Monitor, MonitorState
    from leaklab.service.store import LogRow

    store = Store(tmp_path / "m.db")
    a, _ = store.create_key("a")
    b, _ = store.create_key("b")
    saved = MonitorState(a.id, 120, 0.8, True, 40, "throttle")
    assert store.admit_and_log(a.id, "embeddings", [LogRow("t", 3, "v")], "none", 0, 0, monitor=saved)
    store.add_flag(b.id, 0.6, "noise", {"queries": 30})
    states = {s.key_id: s for s in store.monitor_states()}
    assert states[a.id] == saved and states[b.id].flagged and states[b.id].action == "noise"
    mon = Monitor()
    mon.restore(list(states.values()))
    assert mon.mitigation(a.id) == "throttle" and mon.mitigation(b.id) == "noise" and mon.mitigation("c") is None
    assert mon.state(a.id) == saved
    store.close()


def test_limit_options_are_checked():
    from leaklab.service.config import parse_config

    cfg = parse_config({"server": {"max_body_bytes": 4096}, "keys": {"k": {"limits": {"max_concurrent": 3}}}})
    assert cfg.server.max_body_bytes == 4096 and cfg.limits_for("k").max_concurrent == 3
    for bad in ({"server": {"max_body_bytes": 10}}, {"limits": {"max_concurrent": 0}}, {"server": {"nope": 1}}):
        with pytest.raises(LeaklabError, match=r"server|max_concurrent"):
            parse_config(bad)
