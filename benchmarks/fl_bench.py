"""Attacks on real Flower federations: Flower's defenses against SOMP/DAGER, and the 100-client scale run.

Rerun (each job appends/replaces its rows in benchmarks/results/fl/fl.json and rewrites fl.md + fl.png):
  PYTHONPATH=src python benchmarks/fl_bench.py scale            # leaklab fl simulate --clients 100 --rounds 1
  PYTHONPATH=src python benchmarks/fl_bench.py grid [ROW ...]   # smollm2-135m, 8 clients × B=4, 3 rounds
Each run is the CLI in a subprocess (``leaklab fl simulate``); peak memory is the largest sum of RSS (and of PSS)
over the process tree (driver, Ray raylet/GCS and client actors), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from leaklab.io import atomic_write, atomic_write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fl"
RUNS = Path("/tmp") / "leaklab-fl-bench"
GRID_BASE = [
    "--model",
    "smollm2-135m",
    "--clients",
    "8",
    "--batch-size",
    "4",
    "--rounds",
    "3",
    "--min-tokens",
    "4",
    "--max-tokens",
    "12",
    "--attack",
    "somp",
    "--attack",
    "dager",
    "--lr",
    "0.01",
    "--attack-clients",
    "1",
    "--attack-budget-s",
    "20",
    "--client-cpus",
    "2",  # one client actor at a time (the shared 2 cores; and each actor holds its own model copies)
]
#: the aggregate is attacked where it is what the defense leaves (no defense, SecAgg+, server-side DP from outside)
ONLY_CLIENTS = ["--no-attack-aggregate"]
#: row name -> extra CLI options (the issue's grid)
GRID: dict[str, list[str]] = {
    "no defense (fedsgd)": [],
    "secagg+ (Flower defaults)": ["--defense", "secagg+"],
    "secagg+ (q=2^28, max_weight=4)": ["--defense", "secagg+:quantization_range=268435456,max_weight=4"],
    "server-dp z=0.01 inside": ["--defense", "server-dp:noise=0.01,clip=0.5,view=inside", *ONLY_CLIENTS],
    "server-dp z=0.01 outside": ["--defense", "server-dp:noise=0.01,clip=0.5,view=outside"],
    "server-dp z=1 inside": ["--defense", "server-dp:noise=1,clip=0.5,view=inside", *ONLY_CLIENTS],
    "server-dp z=1 outside": ["--defense", "server-dp:noise=1,clip=0.5,view=outside"],
    "local-dp eps=8": ["--defense", "local-dp:clip=0.5,sensitivity=0.5,epsilon=8", *ONLY_CLIENTS],
    "fedavg 1 step": ["--setting", "fedavg", "--local-steps", "1", *ONLY_CLIENTS],
    "fedavg 3 steps": ["--setting", "fedavg", "--local-steps", "3", *ONLY_CLIENTS],
    "lora r=8": ["--setting", "lora", "--lora-r", "8", *ONLY_CLIENTS],
    "lora r=64": ["--setting", "lora", "--lora-r", "64", *ONLY_CLIENTS],
}
#: the scale run: 100 clients on tiny-llama, one round; every update and the aggregate are captured and stored,
#: SOMP attacks the first 10 client updates (60 s budget each); the aggregate (200 texts, far more tokens than
#: tiny-llama's hidden size of 128) is stored only
SCALE = [
    "--model",
    "tiny-llama",
    "--clients",
    "100",
    "--rounds",
    "1",
    "--attack-clients",
    "10",
    "--attack-budget-s",
    "60",
    "--no-attack-aggregate",
]


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """RSS and PSS summed over the process tree (PSS splits each shared page among the processes mapping it)."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
    return rss, pss


def ray_env() -> dict[str, str]:
    """The CLI's environment with Ray's memory monitor off (unless set): on a shared machine other jobs' memory
    pushes the node past the monitor's threshold and it kills the federation's client actor, the only Ray worker
    there is, leaving rounds with clients missing. The kernel's OOM killer still guards the machine."""
    return {**os.environ, "RAY_memory_monitor_refresh_ms": os.environ.get("RAY_memory_monitor_refresh_ms", "0")}  # noqa: SIM112


def prune(out: Path) -> None:
    """Drop a finished run's update and global-model files (hundreds of MB each on smollm2-135m); its records,
    summary, results.md and leakage.png stay."""
    for f in out.rglob("*.safetensors"):
        f.unlink()


def run_cli(name: str, args: list[str]) -> dict:
    out = RUNS / name.replace(" ", "_").replace("=", "")
    cmd = [sys.executable, "-m", "leaklab.cli", "fl", "simulate", *args, "--out", str(out), "--json"]
    start, peak, peak_pss = time.perf_counter(), 0, 0
    with open(RUNS / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env())
        ps = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                rss, pss = tree_memory(ps)
                peak, peak_pss = max(peak, rss), max(peak_pss, pss)
                time.sleep(0.5)
        finally:  # stopped (timeout, Ctrl-C): the CLI shuts its Ray down on SIGTERM
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    wall = time.perf_counter() - start
    shown = "leaklab fl simulate " + " ".join(shlex.quote(a) for a in args) + " --out DIR"
    row = {
        "name": name,
        "command": shown,
        "exit": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "peak_pss_gib": round(peak_pss / 2**30, 2),
    }
    summary_file = out / "summary.json"
    if proc.returncode == 0 and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        row.update(summarise(summary))
        missing = summary.get("missing_replies") or {}
        if missing:  # a federation with clients killed (e.g. by Ray's memory monitor) is not the row asked for
            row["exit"] = "0, clients missing: " + ", ".join(f"round {k}: {v}" for k, v in missing.items())
        if not summary["records"] and "OutOfMemoryError" in (RUNS / f"{out.name}.log").read_text(errors="replace"):
            row["exit"] = "0, no update: Ray's memory monitor killed the clients"
    prune(out)
    return row


def summarise(summary: dict) -> dict:
    """Mean ROUGE-1 per attack over client updates and over aggregates (recovered ones; outcome counts)."""
    run = summary["run"]
    out: dict = {
        "defense": summary["defense"],
        "utility": summary["utility"],
        "sim_s": summary["seconds"],
        "clients": run["clients"],
        "rounds": run["rounds"],
        "attack_clients": run["attack_clients"],
        "attack_budget_s": run["attack_budget_s"],
    }
    for target in ("clients", "aggregate"):
        for attack in sorted({r["attack"] for r in summary["records"]}):
            rows = [
                r
                for r in summary["records"]
                if r["attack"] == attack and (r["target"] == "aggregate") == (target == "aggregate")
            ]
            if not rows:
                continue
            scored = [r["aggregate"]["rouge1"] for r in rows if r.get("aggregate")]
            out[f"{attack}/{target}"] = {
                "n": len(rows),
                "recovered": len(scored),
                "rouge1": round(sum(scored) / len(scored), 3) if scored else None,
                "outcomes": sorted({r["outcome"] for r in rows if r["status"] != "recovered"})[:2],
            }
    return out


def write(rows: list[dict]) -> None:
    atomic_write_json(RESULTS / "fl.json", rows)
    lines = [
        "# Attacks on real Flower federations (flwr 1.42, Ray simulation engine)",
        "",
        "Rerun: `PYTHONPATH=src python benchmarks/fl_bench.py scale` and `... grid [ROW ...]` "
        "(each row's exact command below; `--out DIR` is any folder). Shared 2-core CPU machine: other jobs ran at "
        "the same time, so wall times are upper bounds. ROUGE-1 cells: mean over the recovered updates "
        "(recovered/attacked); n/a: the attack reported no signal or could not run. Val loss: mean next-token loss "
        "of the global model on 16 public texts, before the first round → after the last.",
        "",
        "| run | clients × rounds | attacked clients/round | exit | wall s | peak RSS GiB | peak PSS GiB | "
        "SOMP clients | DAGER clients | SOMP aggregate | DAGER aggregate | val loss | ε |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def cell(key: str, r: dict = r) -> str:
            v = r.get(key)
            if not v:
                return "—"
            if v["rouge1"] is None:
                return f"n/a ({v['recovered']}/{v['n']} recovered: {'; '.join(v['outcomes'])[:80]})"
            return f"{v['rouge1']:.3f} ({v['recovered']}/{v['n']})"

        util = r.get("utility") or {}
        last = f"{util[min(util, key=int)]:.3f} → {util[max(util, key=int)]:.3f}" if util else "—"
        eps = (r.get("defense") or {}).get("epsilon_total")
        attacked = {0: "all", None: "—"}.get(r.get("attack_clients"), r.get("attack_clients"))
        lines.append(
            f"| {r['name']} | {_clients(r)} × {r.get('rounds', '—')} | {attacked} | {r['exit']} | {r['wall_s']} | "
            f"{r['peak_rss_gib']} | {r.get('peak_pss_gib', '—')} | {cell('somp/clients')} | "
            f"{cell('dager/clients')} | {cell('somp/aggregate')} | {cell('dager/aggregate')} | {last} | "
            f"{f'{eps:.3g}' if eps else '—'} |"
        )
    lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows]
    atomic_write(RESULTS / "fl.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))


def _clients(row: dict) -> str:
    found = re.search(r"--clients (\d+)", row["command"])
    return str(row.get("clients") or (found.group(1) if found else "—"))


def overridden(args: list[str], values: dict[str, str | None]) -> list[str]:
    """``args`` with the value after each flag in ``values`` replaced (None: kept)."""
    out = list(args)
    for flag, value in values.items():
        if value is not None:
            out[out.index(flag) + 1] = value
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def plot(rows: list[dict]) -> None:
    """ROUGE-1 per grid row: SOMP/DAGER on client updates and on the aggregate; not recovered = black x at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["somp/clients", "dager/clients", "somp/aggregate", "dager/aggregate"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for i, r in enumerate(rows):
        for j, key in enumerate(keys):
            cell = r.get(key)
            x = i + (j - 1.5) * width
            if cell and cell["rouge1"] is not None:
                ax.bar(x, cell["rouge1"], width, color=f"C{j}", label=key if i == 0 else None)
            elif cell:
                ax.scatter([x], [0], marker="x", color="black")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mean ROUGE-1 (recovered updates)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(RESULTS / "fl.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=["scale", "grid"])
    ap.add_argument("rows", nargs="*", help="grid rows to run (default: all)")
    ap.add_argument("--rounds", help="grid: rounds instead of 3")
    ap.add_argument("--clients", help="grid: clients instead of 8")
    ap.add_argument("--attack-clients", help="grid: client updates attacked per round instead of 1")
    ap.add_argument("--attack-budget-s", help="grid: budget of each attack run instead of 20 s")
    args = ap.parse_intermixed_args()
    unknown = [r for r in args.rows if r not in GRID]
    if unknown:
        ap.error(f"unknown grid rows {unknown}; valid: {list(GRID)}")
    RUNS.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = overridden(
        GRID_BASE, {f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k not in ("job", "rows")}
    )
    todo = (
        {"scale (100 clients, tiny-llama)": SCALE}
        if args.job == "scale"
        else {k: base + GRID[k] for k in (args.rows or GRID)}  # in the order given
    )
    for name, cli in todo.items():
        row = run_cli(name, cli)
        existing = json.loads((RESULTS / "fl.json").read_text()) if (RESULTS / "fl.json").exists() else []
        existing = [r for r in existing if r["name"] != name] + [row]  # rows of earlier runs stay
        write(existing)
        plot([r for r in existing if r["name"] in GRID])
        leakage = RUNS / name.replace(" ", "_").replace("=", "") / "leakage.png"
        if leakage.exists():
            safe = "".join(c if c.isalnum() else "-" for c in name).strip("-")
            atomic_write(RESULTS / f"leakage-{safe}.png", lambda tmp, src=leakage: tmp.write_bytes(src.read_bytes()))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
