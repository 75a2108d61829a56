"""The real service on a loopback port: auth, OpenAI shape, burst with quotas, SIGKILL durability, fuzzing."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest

from leaklab.service.process import ServerProcess, write_config
from leaklab.service.store import Store

ROUTES = [("/v1/embeddings", {"input": "hello world"}), ("/v1/search", {"query": "hello world", "top_k": 3})]


def _keys(db, *names):
    store = Store(db)
    out = {n: store.create_key(n)[1] for n in names}
    store.close()
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svc")
    db = tmp / "svc.db"
    keys = _keys(db, "alice", "bob", "mallory", "probe", "user")
    cfg = write_config(
        tmp / "cfg.json",
        {
            "search": {"corpus": "chatterbot:english", "limit": 200},
            "limits": {"rate": 1000, "burst": 1000},
            "monitor": {"threshold": 0.25, "action": "noise", "noise_epsilon": 20},
            "defenses": [
                {"kind": "gaussian", "epsilon": 500, "delta": 1e-5},
                {"kind": "quantise", "bits": 8},
            ],
            "keys": {"bob": {"defenses": [{"kind": "rotate", "secret": "0123456789abcdef-secret"}]}},
        },
    )
    with ServerProcess("hashing", db, cfg) as srv:
        yield srv, keys, db


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_data_routes_need_a_valid_unrevoked_key(server):
    srv, keys, db = server
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for path, body in ROUTES:
            assert c.post(path, json=body).status_code == 401
            assert c.post(path, json=body, headers=_auth("lk-nope")).status_code == 401
            assert c.post(path, json={"bad": 1}).status_code == 401  # auth is checked before the body
            assert c.post(path, json=body, headers=_auth(keys["mallory"])).status_code == 200
        Store(db).revoke_key("mallory")
        for path, body in ROUTES:
            r = c.post(path, json=body, headers=_auth(keys["mallory"]))
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200


def test_openai_shape_base64_and_per_key_rotation(server):
    srv, keys, _ = server
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/v1/embeddings", json={"input": ["a cat sat", "on the mat"]}, headers=_auth(keys["alice"]))
        body = r.json()
        assert r.status_code == 200 and body["object"] == "list" and body["model"] == "hashing"
        assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] > 0
        vecs = np.array([d["embedding"] for d in body["data"]])
        assert vecs.shape == (2, 128) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-4)
        r64 = c.post(
            "/v1/embeddings",
            json={"input": "a cat sat", "encoding_format": "base64"},
            headers=_auth(keys["alice"]),
        )
        v64 = np.frombuffer(base64.b64decode(r64.json()["data"][0]["embedding"]), dtype="<f4")
        assert v64.shape == (128,) and float(v64 @ vecs[0]) > 0.3  # same text, fresh noise (sigma ~0.08 per dim)
        # bob's vectors are rotated only: cosines between his own vectors equal the clean ones
        texts = ["a cat sat", "a cat sat on the mat", "stock markets fell sharply"]
        rb = np.array(
            [
                d["embedding"]
                for d in c.post("/v1/embeddings", json={"input": texts}, headers=_auth(keys["bob"])).json()["data"]
            ]
        )
        from leaklab.service.encoders import load_encoder

        clean = load_encoder("hashing").embed(texts)
        assert np.allclose(rb @ rb.T, clean @ clean.T, atol=1e-5)
        assert not np.allclose(rb, clean, atol=1e-2)
        hits = c.post("/v1/search", json={"query": ["what is your name"], "top_k": 5}, headers=_auth(keys["bob"]))
        res = hits.json()["data"][0]["results"]
        assert len(res) == 5 and all(res[i]["score"] >= res[i + 1]["score"] for i in range(4))
        bad = c.post("/v1/embeddings", json={"input": ""}, headers=_auth(keys["alice"]))
        assert bad.status_code == 400 and "empty" in bad.json()["error"]["message"]


def test_monitor_flags_a_live_probe_session_and_escalates_noise(server):
    """An edit-chain inversion loop through the real server is flagged (benign replay is not); the flagged key
    then gets escalated noise, and `leaklab monitor report` lists it with its evidence."""
    from typer.testing import CliRunner

    from leaklab.cli import app
    from leaklab.service.encoders import load_encoder
    from leaklab.service.traffic import benign, edit_chain, load_pools

    srv, keys, db = server
    pools = load_pools()
    rng = np.random.default_rng(0)
    attack = edit_chain(load_encoder("hashing"), pools, rng, 40)
    normal = benign("reviews", pools, rng, 40)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        for a, b in zip(attack, normal, strict=True):
            assert c.post("/v1/embeddings", json={"input": a}, headers=_auth(keys["probe"])).status_code == 200
            assert c.post("/v1/embeddings", json={"input": b}, headers=_auth(keys["user"])).status_code == 200
    res = CliRunner().invoke(app, ["monitor", "report", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    flagged = {r["name"]: r for r in json.loads(res.output)}
    assert "probe" in flagged and "user" not in flagged
    assert flagged["probe"]["evidence"]["features"]["edit_chain"] > 0.5
    defenses = [r["defense"] for r in Store(db).query_rows() if r["key_id"] == keys["probe"].split("-")[1]]
    assert "gaussian(eps=20" in defenses[-1] and "gaussian(eps=20" not in defenses[0]


def test_fuzz_openapi_no_5xx(server):
    """Schemathesis-generated requests (bounded) against the live server: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    srv, keys, _ = server
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    seen = []
    for op in ("/v1/embeddings", "/v1/search", "/health"):
        method = "GET" if op == "/health" else "POST"
        strategy = schema[op][method].as_strategy()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def run(case):
            resp = case.call(base_url=srv.url, headers=_auth(keys["alice"]), timeout=10)
            seen.append(resp.status_code)
            assert resp.status_code < 500, (case.body, resp.text)

        run()
    assert len(seen) >= 40 and any(s == 200 for s in seen)


def _burst(url: str, plan: list[tuple[str, dict]], concurrency: int) -> list[tuple[str, int, str | None]]:
    async def go():
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:

            async def one(name_key, body):
                name, key = name_key
                async with sem:
                    r = await c.post("/v1/embeddings", json=body, headers=_auth(key))
                    return name, r.status_code, r.headers.get("x-request-id")

            return await asyncio.gather(*(one(nk, b) for nk, b in plan))

    return asyncio.run(go())


def test_burst_10k_quota_exact_and_logged(tmp_path):
    """10,000 loopback requests from 3 keys: no 5xx, nobody past its quota, each admitted request logged."""
    db = tmp_path / "burst.db"
    keys = _keys(db, "req-capped", "tok-capped", "rate-capped")
    cfg = write_config(
        tmp_path / "cfg.json",
        {
            "limits": {"rate": 100000, "burst": 100000},
            "monitor": {"enabled": True},
            "defenses": [{"kind": "gaussian", "epsilon": 500, "delta": 1e-5}],
            "keys": {
                "req-capped": {"limits": {"daily_requests": 1500}},
                "tok-capped": {"limits": {"daily_tokens": 9000}},
                "rate-capped": {"limits": {"rate": 50, "burst": 20}},
            },
        },
    )
    rng = np.random.default_rng(0)
    words = [
        "the",
        "cat",
        "dog",
        "sat",
        "ran",
        "on",
        "a",
        "mat",
        "rug",
        "big",
        "small",
        "red",
        "blue",
        "quickly",
    ]
    plan = []
    for i in range(10_000):
        name = ("req-capped", "tok-capped", "rate-capped")[i % 3]
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
        plan.append(((name, keys[name]), {"input": text}))
    with ServerProcess("hashing", db, cfg) as srv:
        t0 = time.monotonic()
        results = _burst(srv.url, plan, concurrency=48)
        elapsed = time.monotonic() - t0
    codes = [c for _, c, _ in results]
    assert len(results) == 10_000 and not [c for c in codes if c >= 500], elapsed
    assert set(codes) <= {200, 429}
    con = sqlite3.connect(db)
    ok = {n: {rid for name, c, rid in results if name == n and c == 200} for n in keys}
    kid = {name: k.split("-")[1] for name, k in keys.items()}
    for name in keys:
        logged = {r[0] for r in con.execute("SELECT DISTINCT request_id FROM queries WHERE key_id=?", (kid[name],))}
        assert ok[name] == logged, name  # every admitted request in the log, nothing else
    assert len(ok["req-capped"]) == 1500  # exactly the quota: 3334 attempts
    used_tokens = con.execute("SELECT tokens FROM usage WHERE key_id=?", (kid["tok-capped"],)).fetchone()[0]
    assert (
        used_tokens <= 9000
        and used_tokens
        == con.execute("SELECT SUM(tokens) FROM queries WHERE key_id=?", (kid["tok-capped"],)).fetchone()[0]
    )
    assert 20 <= len(ok["rate-capped"]) <= 20 + 50 * (elapsed + 1)


def test_sigkill_under_load_loses_no_committed_record(tmp_path):
    """Every request answered 200 before a SIGKILL is in the database after a restart."""
    db = tmp_path / "kill.db"
    key = _keys(db, "k")["k"]
    cfg = write_config(tmp_path / "cfg.json", {"limits": {"rate": 100000, "burst": 100000}})
    answered: list[str] = []
    stop = threading.Event()
    srv = ServerProcess("hashing", db, cfg).start()

    def client(seed: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            i = 0
            while not stop.is_set() and i < 5000:
                i += 1
                try:
                    r = c.post("/v1/embeddings", json={"input": f"load {seed} {i}"}, headers=_auth(key))
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    answered.append(r.headers["x-request-id"])

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(answered) > 50
    with ServerProcess("hashing", db, cfg) as srv2, httpx.Client(base_url=srv2.url, timeout=5) as c:
        assert c.post("/v1/embeddings", json={"input": "after"}, headers=_auth(key)).status_code == 200
    logged = {r[0] for r in sqlite3.connect(db).execute("SELECT request_id FROM queries")}
    missing = set(answered) - logged
    assert not missing, f"{len(missing)} of {len(answered)} committed records lost"
