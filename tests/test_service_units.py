"""Service parts against slow obvious references: DP noise formulas, quantiser, rotation, buckets, monitor."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from scipy.stats import norm

from leaklab.encoders import normalise
from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.service.config import parse_config
from leaklab.service.defenses import (
    API_DEFENSES,
    GaussianNoise,
    MetricDPNoise,
    Quantise,
    Rotate,
    Truncate,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    make_api_defense,
    make_pipeline,
)
from leaklab.service.monitor import Monitor, one_edit, prefix_step
from leaklab.service.ratelimit import RateLimiter
from leaklab.service.store import LogRow, Store, utc_day


def _privacy_loss_delta(sigma: float, eps: float, sens: float = 2.0) -> float:
    """δ(ε) of the Gaussian mechanism by numeric integration of the privacy-loss tail (reference)."""
    x = np.linspace(-40 * sigma, 40 * sigma + sens, 400_001)
    p, q = norm.pdf(x, 0, sigma), norm.pdf(x, sens, sigma)
    return float(np.trapezoid(np.maximum(p - math.exp(eps) * q, 0), x))


@pytest.mark.parametrize("eps", [0.3, 1.0, 4.0, 50.0])
def test_gaussian_sigma_is_tight_dp(eps):
    sigma = analytic_gaussian_sigma(eps, 1e-5)
    assert _privacy_loss_delta(sigma, eps) == pytest.approx(1e-5, rel=2e-2)
    assert _privacy_loss_delta(sigma * 0.95, eps) > 1e-5  # any smaller sigma breaks (ε, δ)
    if eps < 1:
        assert sigma <= classic_gaussian_sigma(eps, 1e-5)


def test_noise_defenses_match_their_distributions():
    rng = np.random.default_rng(0)
    x = normalise(rng.standard_normal((4000, 64)))
    g = GaussianNoise(epsilon=2.0, delta=1e-5)
    assert np.std(g.apply(x, "t", rng) - x) == pytest.approx(g.sigma, rel=0.02)
    m = MetricDPNoise(epsilon=32.0)
    radii = np.linalg.norm(m.apply(x, "t", rng) - x, axis=1)
    assert radii.mean() == pytest.approx(64 / 32.0, rel=0.03)  # Gamma(d, 1/ε) mean d/ε


def test_quantise_truncate_rotate():
    rng = np.random.default_rng(1)
    x = normalise(rng.standard_normal((50, 32)))
    q = Quantise(bits=4, clip=0.5).apply(x, "t", rng)
    step = 1.0 / 15
    assert np.all(np.abs(q - np.clip(x, -0.5, 0.5)) <= step / 2 + 1e-6)
    assert len(np.unique(q)) <= 16
    assert Truncate(dims=8).apply(x, "t", rng).shape == (50, 8)
    rot = Rotate(secret="s" * 16)
    a, b = rot.apply(x, "alice", rng), rot.apply(x, "bob", rng)
    assert np.allclose(a @ a.T, x @ x.T, atol=1e-5) and not np.allclose(a, b, atol=1e-2)
    assert np.allclose(rot.apply(x, "alice", rng), a)  # deterministic per tenant
    pipe = make_pipeline([{"kind": "truncate", "dims": 16}, {"kind": "quantise", "bits": 8}])
    out = pipe.apply(x, "t")
    assert out.shape == (50, 16) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_config_errors_name_the_problem():
    with pytest.raises(UnknownNameError, match="valid: gaussian, metric-dp, quantise, rotate, truncate"):
        parse_config({"defenses": [{"kind": "blur"}]})
    with pytest.raises(LeaklabError, match=r"unknown field.*ratee"):
        parse_config({"limits": {"ratee": 3}})
    with pytest.raises(LeaklabError, match=r"monitor\.action"):
        parse_config({"monitor": {"action": "ban"}})
    with pytest.raises(
        LeaklabError, match=r"defenses\[0\]: API defense 'gaussian' has no option 'eps'; valid: epsilon"
    ):
        parse_config({"defenses": [{"kind": "gaussian", "eps": 1}]})
    with pytest.raises(LeaklabError, match="secret"):
        parse_config({"defenses": [{"kind": "rotate", "secret": "short"}]})
    with pytest.raises(LeaklabError, match=r"keys\.b\.defenses\[0\]: API defense 'quantise' option 'bits'"):
        parse_config({"keys": {"b": {"defenses": [{"kind": "quantise", "bits": "abc"}]}}})
    with pytest.raises(LeaklabError, match=r"metric-dp needs epsilon > 0, finite \(got epsilon=inf\)"):
        parse_config({"defenses": [{"kind": "metric-dp", "epsilon": "inf"}]})
    cfg = parse_config(
        {
            "defenses": [{"kind": "gaussian", "epsilon": "10", "delta": "1e-5"}],
            "keys": {"vip": {"limits": {"daily_requests": 5}}},
        }
    )
    assert cfg.limits_for("vip").daily_requests == 5 and cfg.limits_for("vip").rate == cfg.limits.rate


@pytest.mark.parametrize("kind", API_DEFENSES.names())
def test_every_api_defense_refuses_an_unknown_option_with_one_line_of_its_keys(kind):
    keys = ", ".join(API_DEFENSES.get(kind).config.keys())
    with pytest.raises(LeaklabError) as exc:
        make_api_defense({"kind": kind, "bogus": 1}, "defenses[2]")
    assert str(exc.value) == f"defenses[2]: API defense '{kind}' has no option 'bogus'; valid: {keys}"


def test_api_defense_registry_refuses_duplicates_and_describes_options():
    with pytest.raises(LeaklabError, match="API defense 'gaussian' is already registered"):
        API_DEFENSES.register("gaussian", GaussianNoise, config=GaussianNoise)
    rows = {r["name"]: r["default"] for r in API_DEFENSES.get("quantise").describe()["options"]}
    assert rows == {"bits": 8, "clip": 0.5}
    assert make_api_defense({"kind": "quantise", "bits": 8.0}) == Quantise(bits=8)


def test_token_bucket_against_a_simulation():
    lim = RateLimiter()
    admitted = sum(lim.take("k", rate=5.0, burst=3, now=t * 0.01) == 0.0 for t in range(300))  # 3 s at 100 req/s
    assert admitted == 3 + 14  # the burst, then one per 0.2 s over 2.99 s (refill reaches 15 tokens at 3.0 s)
    wait = lim.take("k", rate=5.0, burst=3, now=3.01)
    assert wait == 0.0 and lim.take("k", rate=5.0, burst=3, now=3.01) == pytest.approx(0.19, abs=1e-6)


def _levenshtein(a, b):
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_one_edit_matches_levenshtein():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        a = tuple(rng.choice(list("abc"), size=int(rng.integers(0, 5))))
        b = tuple(rng.choice(list("abc"), size=int(rng.integers(0, 5))))
        assert one_edit(a, b) == (_levenshtein(a, b) == 1)
    assert prefix_step(("a", "b"), ("a", "b", "c")) and not prefix_step(("a", "b"), ("b", "c", "d"))


def test_monitor_flags_an_edit_chain_not_plain_sentences():
    rng = np.random.default_rng(3)
    mon = Monitor(window=32, min_queries=10, threshold=0.5)
    sentences = [
        f"the {w} was {v} in the morning"
        for w, v in zip(
            [
                "cat",
                "dog",
                "film",
                "plot",
                "actor",
                "song",
                "story",
                "ending",
                "show",
                "book",
                "city",
                "river",
                "train",
                "road",
                "shop",
                "cake",
            ],
            [
                "good",
                "bad",
                "long",
                "short",
                "fine",
                "late",
                "slow",
                "late",
                "great",
                "odd",
                "dull",
                "new",
                "big",
                "late",
                "warm",
                "calm",
            ],
            strict=True,
        )
    ]
    for s in sentences:
        v = mon.observe("benign", [s], normalise(rng.standard_normal((1, 16))))
    assert not v.flagged
    words = ["alpha"]
    for i in range(30):
        words = [*words, f"tok{i % 7}"] if i % 2 else [*words[:-1], f"w{i}"]
        v = mon.observe("probe", [" ".join(words)], normalise(np.ones((1, 16)) + 0.01 * rng.standard_normal((1, 16))))
    assert v.flagged and v.features["edit_chain"] > 0.8


def test_store_quota_is_exact_under_threads(tmp_path):
    store = Store(tmp_path / "q.db")
    rec, _ = store.create_key("k")
    ok = []

    def worker():
        for _ in range(50):
            ok.append(store.admit_and_log(rec.id, "embeddings", [LogRow("t", 3, "v")], "none", 120, 0))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in ok) == 120
    assert len(store.query_rows()) == 120 and store.usage(rec.id, utc_day(time.time())) == (120, 360)


def test_throttle_action_slows_a_flagged_key(tmp_path):
    """In-process app: once the monitor flags a key, its token bucket refills at rate × throttle_factor."""
    from fastapi.testclient import TestClient

    from leaklab.service.app import create_app
    from leaklab.service.encoders import load_encoder

    cfg = parse_config(
        {
            "limits": {"rate": 1000, "burst": 40},
            "monitor": {"threshold": 0.2, "min_queries": 8, "action": "throttle", "throttle_factor": 0.0001},
        }
    )
    store = Store(tmp_path / "t.db")
    _, probe = store.create_key("probe")
    _, user = store.create_key("user")
    client = TestClient(create_app(cfg, store, load_encoder("hashing")))
    words = ["alpha"]
    codes = []
    for i in range(60):
        words = [*words, f"tok{i}"] if i % 2 else [*words[:-1], f"w{i}"]
        r = client.post("/v1/embeddings", json={"input": " ".join(words)}, headers={"Authorization": f"Bearer {probe}"})
        codes.append(r.status_code)
    assert codes[:8] == [200] * 8 and 429 in codes  # the burst drains and no longer refills
    # flagged after ~8 queries: what is left of the 40-token burst drains, then 429 with a long Retry-After
    assert codes.count(200) <= 8 + 40 + 1 and codes[-5:] == [429] * 5 and int(r.headers["retry-after"]) > 1
    ok = client.post("/v1/embeddings", json={"input": "a normal review"}, headers={"Authorization": f"Bearer {user}"})
    assert ok.status_code == 200
