"""Embedding-service benchmark: throughput with all defenses + monitoring vs none (same run, interleaved),
probe-detection TPR at 1% FPR, and privacy–utility curves of the API defenses.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/service_bench.py [--quick]

Writes benchmarks/results/service.md, service.json and service_privacy_utility.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from leaklab._quiet import quiet
from leaklab.io import atomic_write_json, atomic_write_text
from leaklab.report import environment
from leaklab.service.defend_eval import default_sweep, plot_curves, prepare, prior_f1, run_sweep, table_md
from leaklab.service.encoders import load_encoder
from leaklab.service.process import ServerProcess, write_config
from leaklab.service.store import Store
from leaklab.service.traffic import ATTACK_FNS, ATTACKS, BENIGN, benign, load_pools, session_score, tpr_at_fpr

RESULTS = Path(__file__).parent / "results"
HIGH_LIMITS = {"rate": 1e6, "burst": 1000000, "daily_requests": 0, "daily_tokens": 0}
ALL_DEFENSES = [
    {"kind": "gaussian", "epsilon": 3000, "delta": 1e-5},
    {"kind": "metric-dp", "epsilon": 1600},
    {"kind": "quantise", "bits": 8, "clip": 0.25},
    {"kind": "rotate", "secret": "bench-secret-0123456789abcdef"},
]


async def _blast(url: str, key: str, texts: list[str], seconds: float, concurrency: int) -> tuple[int, int]:
    """Send single-text requests for ``seconds``; returns (200 responses, other responses)."""
    ok = bad = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def worker(w: int) -> None:
            nonlocal ok, bad
            i = w
            while time.monotonic() < deadline:
                r = await c.post(
                    "/v1/embeddings",
                    json={"input": texts[i % len(texts)]},
                    headers={"Authorization": f"Bearer {key}"},
                )
                ok, bad = (ok + 1, bad) if r.status_code == 200 else (ok, bad + 1)
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ok, bad


def throughput(model: str, texts: list[str], rounds: int, seconds: float, concurrency: int) -> dict:
    """Two live servers (no defenses/monitor vs all defenses + monitor), measured in alternating rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cfgs = {
            "none": {"limits": HIGH_LIMITS, "monitor": {"enabled": False}},
            "all": {
                "limits": HIGH_LIMITS,
                "defenses": ALL_DEFENSES,
                "monitor": {"enabled": True, "action": "noise", "threshold": 0.5},
            },
        }
        servers, keys = {}, {}
        for name, cfg in cfgs.items():
            db = t / f"{name}.db"
            store = Store(db)
            keys[name] = store.create_key("bench")[1]
            store.close()
            servers[name] = ServerProcess(model, db, write_config(t / f"{name}.json", cfg)).start()
        try:
            counts = {n: [0, 0] for n in cfgs}
            elapsed = {n: 0.0 for n in cfgs}
            for name in cfgs:  # warm-up
                asyncio.run(_blast(servers[name].url, keys[name], texts, 2.0, concurrency))
            for r in range(rounds):
                order = list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]
                for name in order:
                    t0 = time.monotonic()
                    ok, bad = asyncio.run(_blast(servers[name].url, keys[name], texts, seconds, concurrency))
                    elapsed[name] += time.monotonic() - t0
                    counts[name][0] += ok
                    counts[name][1] += bad
        finally:
            for s in servers.values():
                s.stop()
    rps = {n: counts[n][0] / elapsed[n] for n in cfgs}
    return {
        "model": model,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "concurrency": concurrency,
        "requests_per_s_none": rps["none"],
        "requests_per_s_all": rps["all"],
        "ratio": rps["all"] / rps["none"],
        "non_200": {n: counts[n][1] for n in cfgs},
        "defenses_all": ALL_DEFENSES,
    }


def detection(model: str, n_benign: int, n_attack: int, length: int, seed: int) -> dict:
    """Session scores of benign replay vs attack loops; threshold at the 99th percentile of half the benign
    sessions (calibration), FPR measured on the other half, TPR per attack class."""
    enc = load_encoder(model)
    pools = load_pools()
    rng = np.random.default_rng(seed)
    kw = {"window": 64, "min_queries": 16, "threshold": 0.5}
    ben = {
        k: [session_score(enc, benign(k, pools, rng, length), kw) for _ in range(n_benign // len(BENIGN))]
        for k in BENIGN
    }
    att = {
        k: [session_score(enc, ATTACK_FNS[k](enc, pools, rng, length), kw) for _ in range(n_attack)]
        for k in ATTACKS
    }
    all_ben = np.array([s for v in ben.values() for s in v])
    perm = rng.permutation(len(all_ben))
    calib, held = all_ben[perm[: len(perm) // 2]], all_ben[perm[len(perm) // 2 :]]
    out = {"model": model, "session_length": length, "benign_sessions": len(all_ben), "fpr_target": 0.01}
    thr, fpr, _ = tpr_at_fpr(held, np.zeros(1), 0.01, calib)
    out.update({"threshold": thr, "fpr_measured_heldout": fpr})
    out["tpr"] = {k: float(np.mean(np.array(v) > thr)) for k, v in att.items()}
    probing = [s for k in ("greedy-prefix", "edit-chain", "kb-sweep") for s in att[k]]
    out["tpr_probing_loops"] = float(np.mean(np.array(probing) > thr))
    out["benign_score_p99"] = {k: float(np.quantile(v, 0.99)) for k, v in ben.items()}
    out["attack_score_median"] = {k: float(np.median(v)) for k, v in att.items()}
    out["attack_sessions_per_class"] = n_attack
    return out


def privacy_utility(model: str, victims: int, public: int, pairs: int, seed: int) -> tuple[list[dict], float]:
    enc = load_encoder(model)
    data = prepare(enc.embed, "bbc-news:paragraphs", victims, public, seed)
    rows = run_sweep(data, default_sweep(), seed, (0, pairs))
    return rows, prior_f1(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Small sizes (smoke run).")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--detect-model", default=None, help="Encoder of the detection runs (default: --model).")
    args = ap.parse_args()
    quiet()
    q = args.quick
    t0 = time.time()
    timings: dict[str, float] = {}
    report: dict = {
        "environment": environment(),
        "command": "python benchmarks/service_bench.py" + (" --quick" if q else ""),
    }
    texts = list(load_pools().reviews[:400])
    print("throughput ...", file=sys.stderr)
    models = list(dict.fromkeys([args.model, "hashing"]))
    report["throughput"] = [throughput(m, texts, 2 if q else 3, 3.0 if q else 8.0, 8) for m in models]
    timings["throughput"] = time.time() - t0
    print("detection ...", file=sys.stderr)
    dm = args.detect_model or args.model
    report["detection"] = [detection("hashing", 60 if q else 600, 10 if q else 60, 48, 0)]
    if dm != "hashing":
        report["detection"].append(detection(dm, 60 if q else 200, 10 if q else 30, 48, 1))
    timings["detection"] = time.time() - t0 - sum(timings.values())
    print("privacy-utility ...", file=sys.stderr)
    rows, prior = privacy_utility(args.model, 200 if q else 600, 600 if q else 1500, 500, 0)
    timings["privacy_utility"] = time.time() - t0 - sum(timings.values())
    args_str = f" --model {args.model}" + (
        f" --detect-model {args.detect_model}" if args.detect_model else ""
    )
    report["command"] += args_str
    report["privacy_utility"] = {
        "model": args.model,
        "corpus": "bbc-news:paragraphs",
        "rows": rows,
        "prior_bow_token_f1": prior,
    }
    png = RESULTS / "service_privacy_utility.png"
    plot_curves(rows, prior, png, f"{args.model} on bbc-news:paragraphs: adaptive attacker vs utility")
    report["seconds"] = time.time() - t0
    report["timings_s"] = timings
    atomic_write_json(RESULTS / "service.json", report)
    atomic_write_text(RESULTS / "service.md", render(report))
    print(render(report))


def render(r: dict) -> str:
    lines = [
        "# Embedding service benchmark",
        "",
        f"Command: `{r['command']}` ({r['seconds']:.0f} s; sections "
        f"{json.dumps({k: round(v) for k, v in r['timings_s'].items()})} s; {r['environment']['platform']}).",
        "",
        "## Throughput: all defenses + monitoring vs none (same run, alternating rounds)",
        "",
        "| encoder | none (req/s) | all on (req/s) | ratio | target | non-200 |",
        "|---|---|---|---|---|---|",
    ]
    for t in r["throughput"]:
        met = "met" if t["ratio"] >= 0.9 else "MISSED"
        lines.append(
            f"| {t['model']} | {t['requests_per_s_none']:.1f} | {t['requests_per_s_all']:.1f} | "
            f"{t['ratio']:.3f} | >= 0.9: {met} | {t['non_200']} |"
        )
    lines += [
        "",
        f"All-on defenses: {json.dumps(r['throughput'][0]['defenses_all'])}; monitor on, action=noise. "
        "Single-text requests, 8 concurrent loopback clients, each server and the client share the CPU.",
        "",
    ]
    lines += ["## Probe detection: TPR at 1% FPR (session score after N queries)", ""]
    for d in r["detection"]:
        lines += [
            f"Encoder {d['model']}, sessions of {d['session_length']} queries, {d['benign_sessions']} benign "
            f"sessions (half calibrate the threshold {d['threshold']:.3f}, half measure FPR = "
            f"{d['fpr_measured_heldout']:.3f}), {d['attack_sessions_per_class']} attack sessions per class.",
            "",
            "| attack traffic | TPR @ 1% FPR | median score |",
            "|---|---|---|",
        ]
        for k, v in d["tpr"].items():
            lines.append(f"| {k} | {v:.3f} | {d['attack_score_median'][k]:.3f} |")
        lines += [
            f"| probing loops (greedy-prefix + edit-chain + kb-sweep) | {d['tpr_probing_loops']:.3f} | |",
            "",
            "Benign 99th-percentile scores: "
            + ", ".join(f"{k} {v:.3f}" for k, v in d["benign_score_p99"].items())
            + ". alignment-collect (natural public sentences) is benign-looking by construction: the monitor "
            "cannot see it; only quotas bound it.",
            "",
        ]
    pu = r["privacy_utility"]
    lines += [
        "## Privacy–utility (adaptive attacker retrained on defended vectors)",
        "",
        f"Encoder {pu['model']}, corpus {pu['corpus']}; plot: service_privacy_utility.png. "
        "Prior BoW token F1 "
        f"(guessing frequent words, no vector): {pu['prior_bow_token_f1']:.3f}.",
        "",
        table_md(pu["rows"]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
