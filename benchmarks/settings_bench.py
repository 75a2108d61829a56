"""SOMP and DAGER on every threat setting (smollm2-135m + rotten-tomatoes, short texts).

Rerun:  PYTHONPATH=src python benchmarks/settings_bench.py --batch-sizes 4 16 --batches 3
Writes benchmarks/results/settings/settings.{json,md} (rows are appended cell by cell; a rerun of the same
cell replaces it). B is the number of private texts behind the update: per pair count for dpo/reward (the
gradient then holds 2B sequences), and the total over 2 clients for secagg (B/2 each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

from leaklab.experiments.runner import attack_batch
from leaklab.io import atomic_write_json, atomic_write_text
from leaklab.models.registry import ModelRef
from leaklab.threat.observation import ThreatFlags
from leaklab.threat.settings import sample_update

SETTINGS: dict[str, tuple[str, ThreatFlags, dict]] = {
    "fedsgd": ("fedsgd", ThreatFlags(), {}),
    "fedavg (1 step, η=1e-3)": ("fedavg", ThreatFlags(learning_rate=1e-3), {}),
    "fedavg (1 step, η=1e-2)": ("fedavg", ThreatFlags(learning_rate=1e-2), {}),
    "fedavg (3 steps, η=1e-3)": ("fedavg", ThreatFlags(learning_rate=1e-3, local_steps=3), {}),
    "lora r=8": ("lora", ThreatFlags(), {"r": 8}),
    "lora r=256": ("lora", ThreatFlags(), {"r": 256}),
    "dpo (shuffled rejected)": ("dpo", ThreatFlags(), {}),
    "reward (shuffled rejected)": ("reward", ThreatFlags(), {}),
    "secagg (2 clients)": ("secagg", ThreatFlags(), {"clients": 2}),
    "dropout on": ("fedsgd", ThreatFlags(train_mode=True), {}),
}
ATTACKS = ("somp", "dager")  # plain names: the runner applies each setting's view
SCORES = ("rouge1", "rouge2", "token_f1")


def run_cell(label: str, b: int, n: int, model: str, corpus: str) -> list[dict]:
    setting, flags, opts = SETTINGS[label]
    per_update = b // opts.get("clients", 1)
    rows = {a: [] for a in ATTACKS}
    for seed in range(n):
        obs, sec = sample_update(setting, ModelRef(model), corpus, per_update, seed, 8, 32, flags, **opts)
        for a in ATTACKS:
            rec = attack_batch(a, obs, sec, seed=seed)
            rows[a].append({**(rec.aggregate or {}), "seconds": rec.attack_seconds, "status": rec.status})
            if rec.aggregate is None:
                print(f"{label} B={b} seed={seed} {a}: {rec.status}: {rec.reason}", flush=True)
                continue
            s = rec.aggregate
            print(
                f"{label} B={b} seed={seed} {a}: R1={s['rouge1']:.3f} R2={s['rouge2']:.3f} "
                f"F1={s['token_f1']:.3f} {rec.attack_seconds:.1f}s",
                flush=True,
            )
    return [
        {
            "setting": label,
            "B": b,
            "attack": a,
            "batches": n,
            "model": model,
            "corpus": corpus,
            "outcomes": dict(Counter(r["status"] for r in rows[a])),
            **{m: _mean([r.get(m) for r in rows[a] if r["status"] == "recovered"]) for m in SCORES},
            "seconds": statistics.mean(r["seconds"] for r in rows[a]),
        }
        for a in ATTACKS
    ]


def _mean(vals: list[float | None]) -> float | None:
    """Mean over the recovered batches; None (shown as n/a) when the attack recovered none."""
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def write(out: Path, rows: list[dict]) -> None:
    atomic_write_json(out / "settings.json", {"rows": rows, "commit": _commit()})
    lines = [
        "Means over the batches the attack recovered; *outcome* counts the others (could not run, no signal), "
        "which never enter a mean as 0.",
        "",
        "| setting | B | attack | N | outcome | ROUGE-1 | ROUGE-2 | token F1 | s/batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcomes = r.get("outcomes")  # rows from before issue 20 have none (a failure then read as 0)
        outcome = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in outcomes.items()) if outcomes else "not recorded"
        lines.append(
            f"| {r['setting']} | {r['B']} | {r['attack']} | {r['batches']} | {outcome} | {_fmt(r['rouge1'])} | "
            f"{_fmt(r['rouge2'])} | {_fmt(r['token_f1'])} | {_fmt(r['seconds'], '.1f')} |"
        )
    atomic_write_text(out / "settings.md", "\n".join(lines) + "\n")


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="rotten-tomatoes")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/settings"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "settings.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for b in args.batch_sizes:
        for label in args.settings:
            start = time.perf_counter()
            new = run_cell(label, b, args.batches, args.model, args.corpus)
            rows = [r for r in rows if not (r["setting"] == label and r["B"] == b)] + new
            write(args.out, rows)
            print(f"cell {label} B={b} done in {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
