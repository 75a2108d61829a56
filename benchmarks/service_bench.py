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
            pair_ratios = []
            for name in cfgs:  # warm-up
                asyncio.run(_blast(servers[name].url, keys[name], texts, 2.0, concurrency))
            for r in range(rounds):
                order = list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]
                rate = {}
                for name in order:
                    t0 = time.monotonic()
                    ok, bad = asyncio.run(_blast(servers[name].url, keys[name], texts, seconds, concurrency))
                    dt = time.monotonic() - t0
                    elapsed[name] += dt
                    counts[name][0] += ok
                    counts[name][1] += bad
                    rate[name] = ok / dt
                pair_ratios.append(rate["all"] / rate["none"])
        finally:
            for s in servers.values():
                s.stop()
    rps = {n: counts[n][0] / elapsed[n] for n in cfgs}
    q1, med, q3 = (float(x) for x in np.quantile(pair_ratios, [0.25, 0.5, 0.75]))
    return {
        "model": model,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "concurrency": concurrency,
        "requests_per_s_none": rps["none"],
        "requests_per_s_all": rps["all"],
        "ratio_totals": rps["all"] / rps["none"],
        "ratio": med,
        "ratio_iqr": [q1, q3],
        "pair_ratios": pair_ratios,
        "non_200": {n: counts[n][1] for n in cfgs},
        "defenses_all": ALL_DEFENSES,
    }


def overhead(model: str, texts: list[str]) -> dict:
    """In-process cost per single-text request: encoder vs all defenses + monitor (medians)."""
    from leaklab.service.defenses import make_pipeline
    from leaklab.service.monitor import Monitor

    enc = load_encoder(model)
    pipe = make_pipeline(ALL_DEFENSES)
    vocab = frozenset(w for w in enc.tokenizer.get_vocab() if w.isalpha())
    mon = Monitor(64, 16, 0.5, vocab)
    enc_t, extra_t = [], []
    for text in texts:
        t0 = time.perf_counter()
        vec = enc.embed([text])
        t1 = time.perf_counter()
        pipe.apply(vec, "bench")
        mon.observe("bench", [text], vec)
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        extra_t.append(t2 - t1)
    e, x = float(np.median(enc_t)), float(np.median(extra_t))
    return {
        "model": model,
        "requests": len(texts),
        "encode_ms": e * 1e3,
        "defenses_monitor_ms": x * 1e3,
        "throughput_ratio_bound": e / (e + x),
    }


def detection(
    model: str, n_benign: int, n_attack: int, length: int, seed: int, attacks: tuple[str, ...] = ATTACKS
) -> dict:
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
        k: [session_score(enc, ATTACK_FNS[k](enc, pools, rng, length), kw) for _ in range(n_attack)] for k in attacks
    }
    all_ben = np.array([s for v in ben.values() for s in v])
    perm = rng.permutation(len(all_ben))
    calib, held = all_ben[perm[: len(perm) // 2]], all_ben[perm[len(perm) // 2 :]]
    out = {"model": model, "session_length": length, "benign_sessions": len(all_ben), "fpr_target": 0.01}
    thr, fpr, _ = tpr_at_fpr(held, np.zeros(1), 0.01, calib)
    out.update({"threshold": thr, "fpr_measured_heldout": fpr})
    out["tpr"] = {k: float(np.mean(np.array(v) > thr)) for k, v in att.items()}
    probing = [s for k in ("greedy-prefix", "edit-chain", "kb-sweep") if k in att for s in att[k]]
    out["tpr_probing_loops"] = float(np.mean(np.array(probing) > thr)) if probing else None
    out["benign_score_p99"] = {k: float(np.quantile(v, 0.99)) for k, v in ben.items()}
    out["attack_score_median"] = {k: float(np.median(v)) for k, v in att.items()}
    out["attack_sessions_per_class"] = n_attack
    return out


def privacy_utility(model: str, victims: int, public: int, pairs: int, seed: int) -> tuple[list[dict], float]:
    enc = load_encoder(model)
    data = prepare(enc.embed, "bbc-news:paragraphs", victims, public, seed)
    rows = run_sweep(data, default_sweep(), seed, (0, pairs))
    return rows, prior_f1(data)


SECTIONS = ("throughput", "detection", "privacy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Small sizes (smoke run).")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--detect-model", default=None, help="Second encoder of the detection runs (default: --model).")
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="Sections to (re)measure; the others are kept from the existing service.json.",
    )
    ap.add_argument(
        "--detect-sessions",
        default="200,30",
        help="Benign,attack sessions of each detection run on a model other than hashing (hashing: 600,60 at 48 "
        "queries).",
    )
    args = ap.parse_args()
    quiet()
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    if set(sections) - set(SECTIONS):
        ap.error(f"--sections takes {', '.join(SECTIONS)}")
    q = args.quick
    command = "python benchmarks/service_bench.py" + (" --quick" if q else "") + f" --model {args.model}"
    if args.detect_model:
        command += f" --detect-model {args.detect_model}"
    if args.sections != ",".join(SECTIONS):
        command += f" --sections {args.sections}"
    if args.detect_sessions != "200,30":
        command += f" --detect-sessions {args.detect_sessions}"
    path = RESULTS / "service.json"
    report: dict = json.loads(path.read_text(encoding="utf-8")) if path.exists() and len(sections) < 3 else {}
    report["environment"] = environment()
    report.setdefault("commands", {})
    report.setdefault("timings_s", {})
    texts = list(load_pools().reviews[:400])
    if "throughput" in sections:
        t0 = time.time()
        print("throughput ...", file=sys.stderr)
        models = list(dict.fromkeys([args.model, "hashing"]))
        report["throughput"] = [throughput(m, texts, 4 if q else 12, 2.0 if q else 4.0, 8) for m in models]
        report["overhead"] = [overhead(m, texts[:100] if q else texts[:300]) for m in models]
        report["timings_s"]["throughput"], report["commands"]["throughput"] = time.time() - t0, command
    if "detection" in sections:
        t0 = time.time()
        print("detection ...", file=sys.stderr)
        dm = args.detect_model or args.model
        n_ben, n_att = (60, 10) if q else (int(x) for x in args.detect_sessions.split(","))
        runs = [detection("hashing", 60 if q else 600, 10 if q else 60, 48, 0)]
        if dm != "hashing":
            runs.append(detection(dm, n_ben, n_att, 48, 1))
        padded = ("padded-edit-chain", "alignment-collect")  # the issue-23 case: 120 queries, 3 pads per probe
        for m in dict.fromkeys(["hashing", dm]):
            nb, na = (200, 30) if m == "hashing" and not q else (n_ben, n_att)
            runs.append(detection(m, nb, na, 120, 2, padded))
        for r in runs:
            r["command"] = command
        fresh = {(r["model"], r["session_length"]) for r in runs}
        kept = [d for d in report.get("detection", []) if (d["model"], d["session_length"]) not in fresh]
        report["detection"] = kept + runs
        report["timings_s"]["detection"], report["commands"]["detection"] = time.time() - t0, command
    if "privacy" in sections:
        t0 = time.time()
        print("privacy-utility ...", file=sys.stderr)
        rows, prior = privacy_utility(args.model, 200 if q else 600, 600 if q else 1500, 500, 0)
        report["privacy_utility"] = {
            "model": args.model,
            "corpus": "bbc-news:paragraphs",
            "rows": rows,
            "prior_bow_token_f1": prior,
        }
        png = RESULTS / "service_privacy_utility.png"
        plot_curves(rows, prior, png, f"{args.model} on bbc-news:paragraphs: adaptive attacker vs utility")
        report["timings_s"]["privacy_utility"], report["commands"]["privacy"] = time.time() - t0, command
    atomic_write_json(path, report)
    atomic_write_text(RESULTS / "service.md", render(report))
    print(render(report))


def render(r: dict) -> str:
    lines = [
        "# Embedding service benchmark",
        "",
        f"Seconds per section: {json.dumps({k: round(v) for k, v in r['timings_s'].items()})} "
        f"({r['environment']['platform']}, 2 CPU cores shared with other jobs).",
        "",
        "## Throughput: all defenses + monitoring vs none (same run, alternating rounds)",
        "",
        f"Measured by `{r['commands']['throughput']}`.",
        "",
        "| encoder | none (req/s) | all on (req/s) | ratio | target | non-200 |",
        "|---|---|---|---|---|---|",
    ]
    for t in r["throughput"]:
        met = "met" if t["ratio"] >= 0.9 else "MISSED"
        lines.append(
            f"| {t['model']} | {t['requests_per_s_none']:.1f} | {t['requests_per_s_all']:.1f} | "
            f"{t['ratio']:.3f} (IQR {t['ratio_iqr'][0]:.2f}–{t['ratio_iqr'][1]:.2f}; totals "
            f"{t['ratio_totals']:.3f}) | >= 0.9: {met} | {t['non_200']} |"
        )
    t0 = r["throughput"][0]
    lines += [
        "",
        f"Ratio = median over {t0['rounds']} paired rounds ({t0['seconds_per_round']:g} s each, order "
        "alternating) "
        "of all-on req/s / none req/s. All-on defenses: "
        f"{json.dumps(t0['defenses_all'])}; monitor on, action=noise. Single-text requests, "
        f"{t0['concurrency']} concurrent loopback clients; both servers and the client share the 2 CPU cores "
        "with other jobs, so round-to-round noise is large.",
        "",
        "In-process cost per single-text request (median; what the defenses and monitor add to the encoder):",
        "",
        "| encoder | encode (ms) | defenses + monitor (ms) | throughput bound encode/(encode+extra) |",
        "|---|---|---|---|",
    ]
    for o in r.get("overhead", []):
        lines.append(
            f"| {o['model']} | {o['encode_ms']:.2f} | {o['defenses_monitor_ms']:.3f} | "
            f"{o['throughput_ratio_bound']:.3f} |"
        )
    lines.append("")
    lines += [
        "## Probe detection: TPR at 1% FPR (session score after N queries)",
        "",
    ]
    for d in r["detection"]:
        how = f"`{d['command']}`" if "command" in d else "an earlier version, before the probe-cluster feature"
        lines += [
            f"Measured by {how}.",
            "",
            f"Encoder {d['model']}, sessions of {d['session_length']} queries, {d['benign_sessions']} benign "
            f"sessions (half calibrate the threshold {d['threshold']:.3f}, half measure FPR = "
            f"{d['fpr_measured_heldout']:.3f}), {d['attack_sessions_per_class']} attack sessions per class.",
            "",
            "| attack traffic | TPR @ 1% FPR | median score |",
            "|---|---|---|",
        ]
        for k, v in d["tpr"].items():
            lines.append(f"| {k} | {v:.3f} | {d['attack_score_median'][k]:.3f} |")
        if d["tpr_probing_loops"] is not None:
            lines.append(f"| probing loops (greedy-prefix + edit-chain + kb-sweep) | {d['tpr_probing_loops']:.3f} | |")
        lines += [
            "",
            "Benign 99th-percentile scores: "
            + ", ".join(f"{k} {v:.3f}" for k, v in d["benign_score_p99"].items())
            + ". alignment-collect (natural public sentences) is benign-looking by construction: the monitor "
            "cannot see it; only quotas bound it. padded-edit-chain (where measured) is the evasion of the "
            "edit-chain loop with 3 natural public sentences after every probe: 4x the queries per probe; the "
            "monitor's probe-cluster feature (edit-linked queries of >= 5 words forming one cluster) sees it.",
            "",
        ]
    pu = r["privacy_utility"]
    lines += [
        "## Privacy–utility (adaptive attacker retrained on defended vectors)",
        "",
        f"Measured by `{r['commands']['privacy']}`.",
        "",
        f"Encoder {pu['model']}, corpus {pu['corpus']}; plot: service_privacy_utility.png. "
        "Prior BoW token F1 "
        f"(guessing frequent words, no vector): {pu['prior_bow_token_f1']:.3f}.",
        "",
        "The attacker is the registered `bow` attack (options augment=0, decode=threshold, vocab=2000) and the "
        "registered `nearest` attack (every public text and the victim's documents as candidates, k=1), run by the "
        "embedding runner on an access object: the victim-tenant vectors that leaked, the attacker's own tenant "
        "of the defended API as a counting black-box encoder (retrained per defense, fresh noise per call) and, "
        "with known pairs, victim-tenant (text, vector) pairs that map the victim's space onto its own when "
        "that beats the identity on held-out pairs.",
        "",
        "Why these numbers moved (issue 20, one runner): before, defend-eval ran its own ridge probe over "
        "content words (stopwords and words of ≤ 2 letters dropped) and scored the F1 of content-word sets; "
        "BoW token F1 is now the bow attack's own score, the F1 of all words' multisets (before: 0.167 for "
        "the `none` row, prior 0.066), and the prior is computed with that same metric. NN "
        "re-identification moved only where the defense is random: the candidates are now embedded through "
        "the attacker's tenant in the attack's own call (fresh noise) rather than from the shared draw. "
        "Utility columns are unchanged (same victim draw and seed). The prior guesses the m most frequent public "
        "words with m chosen on the victim's texts (an optimistic baseline): under strong noise, truncation to "
        "4–8 dims or rotation without pairs the bow attack scores below it, i.e. the vector then tells it less "
        "than word frequencies do.",
        "",
        table_md(pu["rows"]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
