"""Attacks on real Flower federations: Flower's defenses against SOMP/DAGER, and the 100-client scale run.

Rerun (each job appends/replaces its rows in benchmarks/results/fl/fl.json and rewrites fl.md + fl.png):
  PYTHONPATH=src python benchmarks/fl_bench.py scale            # leaklab fl simulate --clients 100 --rounds 1
  PYTHONPATH=src python benchmarks/fl_bench.py grid [ROW ...]   # smollm2-135m, 8 clients × B=4, 3 rounds
Each run is the CLI in a subprocess (``leaklab fl simulate``); peak memory is the largest sum of RSS (and of PSS)
over the process tree (driver, Ray raylet/GCS and client actors), sampled every 0.5 s; each row's ``memory`` holds
the peaks per phase (startup, round N, the deferred attacks) and per kind of process, ``memory-<row>.png`` the
timeline. ``server-dp z=… inside+outside`` is one federation audited at both places, written as its two rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
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
    # one federation serving an inside and an outside row (view=both: the auditor at both places)
    "server-dp z=0.01 inside+outside": ["--defense", "server-dp:noise=0.01,clip=0.5,view=both"],
    "server-dp z=1 inside+outside": ["--defense", "server-dp:noise=1,clip=0.5,view=both"],
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


def process_kind(p: psutil.Process, root: psutil.Process) -> str:
    """Which part of the federation a process is: the driver (the CLI: server, auditor, simulation engine), a
    Flower client actor, Ray's raylet or GCS, or another Ray process (idle workers, log monitor, agents)."""
    if p.pid == root.pid:
        return "driver"
    cmd = " ".join(p.cmdline())
    if "ClientAppActor" in cmd:
        return "client actor"
    for kind in ("raylet", "gcs_server"):
        if kind in cmd:
            return kind
    return "ray other"


def tree_memory(proc: psutil.Process) -> dict[str, tuple[int, int]]:
    """RSS and PSS per kind of process in the tree (PSS splits each shared page among the processes mapping it)."""
    out: dict[str, tuple[int, int]] = {}
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info, kind = p.memory_full_info(), process_kind(p, proc)
            rss, pss = out.get(kind, (0, 0))
            out[kind] = (rss + info.rss, pss + info.pss)
    return out


class MemoryLog:
    """Samples of the process tree's memory per kind of process, each tagged with the run's phase: ``startup``,
    ``round N`` while Ray runs (N: the newest round a client has trained), ``attacks`` once Ray is gone (the
    deferred attacks on the stored updates). Peaks per phase: the largest total and, at that moment, each kind;
    and each kind's own largest value in the phase."""

    def __init__(self, out: Path):
        self.out = out
        self.samples: list[dict] = []
        self.ray_seen = False
        self.start = time.perf_counter()

    def phase(self, kinds: set[str]) -> str:
        if "raylet" in kinds:
            self.ray_seen = True
            # a round's folder appears when its global model is saved (rounds ≥ 2) or a client has trained
            rounds = [int(f.name.split("-")[1]) for f in self.out.glob("round-*")]
            rounds += [int(f.name.split("-")[1]) for f in self.out.glob("secrets/round-*")]
            return f"round {max(rounds)}" if rounds else "startup"
        return "attacks" if self.ray_seen else "startup"

    def sample(self, proc: psutil.Process) -> None:
        mem = tree_memory(proc)
        self.samples.append(
            {
                "t": round(time.perf_counter() - self.start, 1),
                "phase": self.phase(set(mem)),
                "rss": {k: v[0] for k, v in mem.items()},
                "pss": {k: v[1] for k, v in mem.items()},
            }
        )

    def peaks(self) -> dict:
        """Per phase: peak total RSS/PSS (GiB), each kind's RSS/PSS at the RSS peak, and each kind's own peak."""
        gib = 2**30
        out: dict = {}
        for phase in dict.fromkeys(s["phase"] for s in self.samples):
            rows = [s for s in self.samples if s["phase"] == phase]
            top = max(rows, key=lambda s: sum(s["rss"].values()))
            kinds = sorted({k for s in rows for k in s["rss"]})
            out[phase] = {
                "seconds": round(rows[-1]["t"] - rows[0]["t"], 1),
                "peak_rss_gib": round(sum(top["rss"].values()) / gib, 2),
                "peak_pss_gib": round(max(sum(s["pss"].values()) for s in rows) / gib, 2),
                "at_peak_rss_gib": {k: round(top["rss"].get(k, 0) / gib, 2) for k in kinds},
                "at_peak_pss_gib": {k: round(top["pss"].get(k, 0) / gib, 2) for k in kinds},
                "own_peak_rss_gib": {k: round(max(s["rss"].get(k, 0) for s in rows) / gib, 2) for k in kinds},
            }
        return out

    def totals(self) -> tuple[int, int]:
        return (
            max((sum(s["rss"].values()) for s in self.samples), default=0),
            max((sum(s["pss"].values()) for s in self.samples), default=0),
        )


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


def run_dir(name: str) -> Path:
    return RUNS / name.replace(" ", "_").replace("=", "")


def run_cli(name: str, args: list[str]) -> dict:
    out = run_dir(name)
    shutil.rmtree(out, ignore_errors=True)  # a previous run's round folders would mislabel the phases
    cmd = [sys.executable, "-m", "leaklab.cli", "fl", "simulate", *args, "--out", str(out), "--json"]
    start, memory = time.perf_counter(), MemoryLog(out)
    with open(RUNS / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env())
        ps = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                memory.sample(ps)
                time.sleep(0.5)
        finally:  # stopped (timeout, Ctrl-C): the CLI shuts its Ray down on SIGTERM
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    atomic_write_json(RUNS / f"{out.name}.memory.json", memory.samples)
    peak, peak_pss = memory.totals()
    wall = time.perf_counter() - start
    shown = "leaklab fl simulate " + " ".join(shlex.quote(a) for a in args) + " --out DIR"
    row = {
        "name": name,
        "command": shown,
        "exit": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "peak_pss_gib": round(peak_pss / 2**30, 2),
        "memory": memory.peaks(),
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


def default_rows() -> list[str]:
    """Every grid row, the server-DP views by their shared federation (not one run per view)."""
    shared = {k.removesuffix(" inside+outside") for k in GRID if k.endswith(" inside+outside")}
    return [k for k in GRID if not (k.rpartition(" ")[2] in ("inside", "outside") and k.rpartition(" ")[0] in shared)]


def split_views(row: dict) -> list[dict]:
    """A ``... inside+outside`` row (one federation, view=both) as its inside row (the client-update cells) and
    its outside row (the aggregate cells); other rows as they are."""
    if not row["name"].endswith(" inside+outside"):
        return [row]
    stem = row["name"].removesuffix(" inside+outside")
    inside = {k: v for k, v in row.items() if not k.endswith("/aggregate")}
    outside = {k: v for k, v in row.items() if not k.endswith("/clients")}
    return [{**inside, "name": f"{stem} inside"}, {**outside, "name": f"{stem} outside"}]


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


def plot_memory(samples: list[dict], path: Path, title: str) -> None:
    """RSS per kind of process over the run (stacked), the phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["driver", "client actor", "raylet", "gcs_server", "ray other"]
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.stackplot(t, *[[s["rss"].get(k, 0) / 2**30 for s in samples] for k in kinds], labels=kinds)
    for i, s in enumerate(samples):
        if i == 0 or s["phase"] != samples[i - 1]["phase"]:
            ax.axvline(s["t"], color="black", lw=0.5)
            ax.text(s["t"], ax.get_ylim()[1] * 0.97, s["phase"], fontsize=7, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS GiB (stacked per kind of process)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, 0.9))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
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
        else {k: base + GRID[k] for k in (args.rows or default_rows())}  # in the order given
    )
    for name, cli in todo.items():
        row = run_cli(name, cli)
        rows = split_views(row)
        existing = json.loads((RESULTS / "fl.json").read_text()) if (RESULTS / "fl.json").exists() else []
        names = {r["name"] for r in rows}
        existing = [r for r in existing if r["name"] not in names] + rows  # rows of earlier runs stay
        write(existing)
        plot([r for r in existing if r["name"] in GRID])
        leakage = run_dir(name) / "leakage.png"
        safe = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        samples = Path(f"{run_dir(name)}.memory.json")
        if samples.exists():
            plot_memory(json.loads(samples.read_text()), RESULTS / f"memory-{safe}.png", name)
        if leakage.exists():
            atomic_write(RESULTS / f"leakage-{safe}.png", lambda tmp, src=leakage: tmp.write_bytes(src.read_bytes()))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
