"""Naive vs adaptive SOMP against each defense, side by side on the same defended updates, with each defense's
utility over a training horizon (smollm2-135m, rotten-tomatoes 8–32 tokens, FedSGD, B = 4).

Each (defense, strength, batch) update is computed once (``defended_update``: DP-SGD on the client, the others
on the computed update) and given to ``somp`` (ignores the defense) and to ``somp-adaptive`` (knows it: low-rank
completion of the kept coordinates / projection with the known noise std / nothing to undo for clipping).
Every attacker runs in a forked child under a wall-clock budget per batch; one still running at the budget is
stopped and recorded as a *budget stop* (an outcome, never a score); so is one that exceeds its memory cap
(12 GiB of address space: the machine is shared). SOMP's own decoding budget is set to half
of it so that a slow decode can still return a best-effort result.

``--horizon`` instead measures, per defense point and undefended, the validation loss on 16 public texts after
``--steps`` consecutive defended FedSGD rounds (batch seeds 0, 1, …: the same batches at every point), via
``leaklab.defenses.utility.horizon_utility``.

Points go to ``points.json`` as each finishes; a rerun skips the finished ones. ``adaptive.md`` holds the table:

    python benchmarks/adaptive_bench.py --out benchmarks/results/sweeps/adaptive --batches 2
    python benchmarks/adaptive_bench.py --out benchmarks/results/sweeps/adaptive --horizon --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gc
import json
import multiprocessing as mp
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaklab.defenses import defended_update, make_defense
from leaklab.defenses.utility import HorizonOptions, horizon_utility
from leaklab.experiments.runner import attack_batch
from leaklab.io import atomic_write, atomic_write_json, atomic_write_text
from leaklab.models import ModelRef, load_model
from leaklab.report.run import environment

CORPUS, MIN_TOKENS, MAX_TOKENS = "rotten-tomatoes", 8, 32
#: the points in the order they run (the issue's targets first)
POINTS: list[tuple[str, str, float]] = [
    ("gaussian", "sigma", 1e-4),
    ("topk", "fraction", 0.01),
    ("dpsgd", "epsilon", 8),
    ("dpsgd", "epsilon", 64),
    ("gaussian", "sigma", 1e-5),
    ("gaussian", "sigma", 1e-6),
    ("topk", "fraction", 0.1),
    ("topk", "fraction", 0.5),
    ("clip", "max_norm", 0.01),
]
ATTACKS = ("somp", "somp-adaptive")
#: each attacker's version per defense family, recorded on every result; a result of another version is rerun.
#: Naive SOMP: "somp-s18" (session 18's code; earlier rows carry no version). Adaptive, noise (Gaussian, DP-SGD):
#: session 17's token selection with the known σ, then the pool decoder. Adaptive, top-k: session 17's kept-block
#: tokens, low-rank completion and OMP on kept coordinates; "topk-kept-block-2" (session 18): with kept-block tokens
#: the layer-1 group is refit on their span from its kept entries instead of completed; "topk-kept-rows-3"
#: (session 18): without a saturated block, the tokens whose embedding-gradient row keeps half its entries.
VERSIONS: dict[str, dict[str, str]] = {
    "somp": {"gaussian": "somp-s18", "dpsgd": "somp-s18", "topk": "somp-s18", "clip": "somp-s18"},
    "somp-adaptive": {"gaussian": "noise-selection-1", "dpsgd": "noise-selection-1", "topk": "topk-kept-rows-3"},
}


def key(defense: str, value: float, batch: int) -> str:
    return f"{defense}={value:g}#{batch}"


#: address-space cap of each attacker's child, so that one attacker cannot take the shared machine's memory
MEMORY_CAP_BYTES = 20 * 2**30


def _child(conn: Any, attack: str, obs: Any, secret: Any, options: dict[str, Any]) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    rec = attack_batch(attack, obs, secret, options=options)
    agg = rec.aggregate or {}
    conn.send(
        {
            "status": rec.status,
            "reason": rec.reason,
            "rouge1": agg.get("rouge1"),
            "rouge2": agg.get("rouge2"),
            "seconds": rec.attack_seconds,
            "adaptive": rec.info.get("adaptive"),
        }
    )
    conn.close()


def budgeted(attack: str, obs: Any, secret: Any, budget_s: float) -> dict[str, Any]:
    """``attack`` on ``obs`` in a forked child; stopped at ``budget_s`` wall seconds (a budget stop)."""
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    options = {"budget_s": budget_s / 2}
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(there, attack, obs, secret, options), daemon=True)
    proc.start()
    there.close()
    out, status, reason = None, "budget_stop", f"stopped at the {budget_s:g} s wall-clock budget per batch"
    if here.poll(budget_s):
        try:
            out = here.recv()
        except EOFError:  # the child died first: over the memory cap, or the machine ran out of memory
            status, reason = (
                "died",
                (
                    f"the attacker's process ended without a result (over the {MEMORY_CAP_BYTES >> 30} GiB cap, or "
                    "the shared machine out of memory: not an outcome of the attack; rerun it)"
                ),
            )
    proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if out is None:
        out = {"status": status, "reason": reason, "rouge1": None, "rouge2": None, "adaptive": None}
        out["seconds"] = time.perf_counter() - t0
        out["exitcode"] = proc.exitcode
    out["options"] = options
    return out


def defended(ref: ModelRef, defense: str, param: str, value: float, batch: int, size: int) -> tuple[Any, Any]:
    out = defended_update(
        "fedsgd", ref, CORPUS, size, batch, [make_defense(defense, **{param: value})], MIN_TOKENS, MAX_TOKENS
    )
    release_memory()
    return out


def release_memory() -> None:
    """Hand the training step's freed heap back to the system before the attacker's child is forked (the
    machine is shared: a parent that keeps it makes every child's copy-on-write pages count twice)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_attacks(
    out: Path,
    done: dict,
    ref: ModelRef,
    size: int,
    batches: int,
    budgets: dict[str, float],
    only: set[str] | None,
    attackers: tuple[str, ...] = ATTACKS,
) -> None:
    """Every point (``only``: the named ``defense=value`` ones) on batches 0…``batches``−1, the adaptive attacker
    over all batches first (the credited number), then the naive one; a finished result is kept unless another
    version of its attacker produced it (:data:`VERSIONS`). Each result is written as soon as it finishes."""
    for atk in [a for a in reversed(ATTACKS) if a in attackers]:
        for i in range(batches):
            for defense, param, value in POINTS:
                if (only is not None and f"{defense}={value:g}" not in only) or (defense == "clip" and atk != "somp"):
                    continue
                k = key(defense, value, i)
                row = load(out)["points"].get(k, {})  # fresh: another process may have written this point
                if not stale(row.get(atk), atk, defense):
                    continue
                obs, secret = defended(ref, defense, param, value, i, size)
                result = budgeted(atk, obs, secret, budgets[atk])
                result["version"] = VERSIONS[atk][defense]
                result["commit"] = COMMIT
                print(k, atk, result["status"], result["rouge1"], round(result["seconds"], 1), flush=True)
                record(out, done, k, {"defense": defense, "value": value, "batch": i}, atk, result)


def stale(result: dict | None, attack: str, defense: str) -> bool:
    return result is None or result["status"] == "died" or result.get("version") != VERSIONS[attack][defense]


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


#: the code's commit, recorded on each result (the working tree may hold uncommitted changes on top)
COMMIT = _commit()


def load(out: Path) -> dict:
    path = out / "points.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    done.setdefault("points", {})
    done.setdefault("horizon", {})
    return done


def record(out: Path, done: dict, k: str, fields: dict, atk: str, result: dict) -> None:
    """Write one attacker's result for point ``k`` into ``points.json``, merged with what is on disk under a file
    lock (two bench processes may run different points at once), and refresh ``done`` from the merge."""
    with open(out / ".points.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = load(out)
        merged["points"].setdefault(k, dict(fields))[atk] = result
        merged["budgets_s"] = done.get("budgets_s", merged.get("budgets_s"))
        save(out, merged)
    done.clear()
    done.update(merged)


def run_horizon(out: Path, done: dict, ref: ModelRef, size: int, steps: int) -> None:
    opts = HorizonOptions(steps=steps)
    for defense, param, value in [("none", "", 0.0), *POINTS]:
        k = f"{defense}={value:g}"
        if k in done["horizon"] and done["horizon"][k]["steps"] == steps:
            continue
        defs = [] if defense == "none" else [make_defense(defense, **{param: value})]
        t0 = time.perf_counter()
        res = horizon_utility("fedsgd", ref, CORPUS, size, 0, defs, opts, MIN_TOKENS, MAX_TOKENS)
        entry = {**res, "defense": defense, "value": value, "seconds": time.perf_counter() - t0}
        print("horizon", k, round(res["loss"], 4), round(time.perf_counter() - t0, 1), flush=True)
        with open(out / ".points.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = load(out)
            merged["horizon"][k] = entry
            save(out, merged)
        done.clear()
        done.update(merged)


def save(out: Path, done: dict) -> None:
    done["environment"] = environment()
    atomic_write_json(out / "points.json", done)


# ----------------------------------------------------------------------------- the table
def _cell(rows: list[dict], atk: str) -> str:
    if rows and all(atk not in r for r in rows) and atk == "somp-adaptive":
        return "same as naive (nothing to undo)"
    rows = [r for r in rows if atk in r]
    if not rows:
        return "not measured"
    scored = [r[atk]["rouge1"] for r in rows if r[atk]["status"] == "recovered" and r[atk]["rouge1"] is not None]
    other = [r[atk]["status"].replace("_", " ") for r in rows if r[atk]["status"] != "recovered"]
    text = f"{np.mean(scored):.3f}" if scored else "n/a"
    if scored and len(scored) > 1:
        text += f" [{min(scored):.2f}–{max(scored):.2f}]"
    return text + (f" ({len(other)}/{len(rows)} {', '.join(sorted(set(other)))})" if other else "")


def _count(rows: list[dict]) -> str:
    naive = sum("somp" in r for r in rows)
    adaptive = sum("somp-adaptive" in r for r in rows)
    return f"{naive} / {adaptive}" if adaptive else str(naive)


def _step(rows: list[dict]) -> str:
    rows = [r for r in rows if "somp-adaptive" in r]
    if not rows:
        return "–"
    first = min(rows, key=lambda r: r["batch"])["somp-adaptive"]
    text = _step_text(first)
    return text if first.get("version") else f"session 16 attacker: {text}"


def _versions(rows: list[dict]) -> str:
    """The attacker versions behind a cell's rows, naive / adaptive (rows without one: "s16", session 16's)."""
    parts = []
    for atk in ATTACKS:
        got = sorted({r[atk].get("version") or "s16" for r in rows if atk in r})
        parts.append(", ".join(got) if got else "–")
    return " / ".join(parts)


def _step_text(result: dict) -> str:
    info = result.get("adaptive") or {}
    step = (info.get("steps") or [{}])[0]
    if "groups" in step:
        what = "completion ranks " + "/".join(str(g["rank"]) for g in step["groups"])
        if step.get("layer1"):
            source = "kept-row" if step.get("kept_rows") else "kept-block"
            what = f"layer 1 refit on {step['layer1']['rebuilt_on_tokens']} {source} tokens, layer-2 " + what
        return what + (" (underdetermined)" if any(g["underdetermined"] for g in step["groups"]) else "")
    if "token_selection" in step:
        sel = step["token_selection"]["selected"]
        return f"σ={step['sigma']:.2g}, {sel} tokens selected, kept ranks " + "/".join(
            str(r) for r in step["kept_ranks"][1:]
        )
    if "kept_ranks" in step:
        return f"σ={step['sigma']:.2g}, kept ranks " + "/".join(str(r) for r in step["kept_ranks"])
    return step.get("note", "–")


def _mean_seconds(rows: list[dict], atk: str) -> str:
    vals = [r[atk]["seconds"] for r in rows if atk in r]
    return f"{np.mean(vals):.0f}" if vals else "–"


def write_table(out: Path, done: dict, model: str, size: int, budgets: dict[str, float], steps: int) -> None:
    horizon = done.get("horizon", {})
    base = horizon.get("none=0")
    lines = [
        f"# Naive vs adaptive SOMP against defenses, with utility over {steps} rounds ({model}, B = {size}, "
        f"{CORPUS} {MIN_TOKENS}–{MAX_TOKENS} tokens, FedSGD)",
        "",
        "Generated by `python benchmarks/adaptive_bench.py --out benchmarks/results/sweeps/adaptive --batches N` "
        f"(attacks; budgets: naive {budgets['somp']:g} s, adaptive {budgets['somp-adaptive']:g} s wall per "
        "batch, SOMP's own decoding budget half of it; the session 16 attacker's rows: 240 s) and "
        "`... --horizon --steps "
        f"{steps}` (utility). Each point: the same defended update (batch seeds 0, 1, …) to both attackers. "
        "A *budget stop* is an attacker still running at its budget: an outcome, not a score. The machine "
        "(2 cores) was shared with 3–4 other helpers' jobs (one thread per job): seconds are wall time under load.",
        "",
        "Utility: validation loss on 16 public texts after the stated number of consecutive defended FedSGD "
        "rounds (server step θ ← θ − 10⁻³·g, batch seeds 0…N−1, the same batches at every point); "
        + (
            f"undefended: {base['loss']:.4f} (before training {base['loss_before']:.4f})."
            if base
            else "undefended run not measured."
        ),
        "",
        "| defense | strength | batches (naive / adaptive) | SOMP (naive) ROUGE-1 | SOMP-adaptive ROUGE-1 | "
        "adaptive step (first batch) | attacker versions (naive / adaptive) | "
        f"s naive | s adaptive | val. loss after {steps} rounds | vs undefended |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for defense, _, value in POINTS:
        rows = [p for p in done["points"].values() if p["defense"] == defense and p["value"] == value]
        h = horizon.get(f"{defense}={value:g}")
        hl = f"{h['loss']:.4f}" if h else "not measured"
        rel = f"{h['loss'] - base['loss']:+.4f}" if h and base else "–"
        if not rows:
            lines.append(f"| {defense} | {value:g} | 0 | not measured | not measured | – | – | – | – | {hl} | {rel} |")
            continue
        lines.append(
            f"| {defense} | {value:g} | {_count(rows)} | {_cell(rows, 'somp')} | {_cell(rows, 'somp-adaptive')} | "
            f"{_step(rows)} | {_versions(rows)} | {_mean_seconds(rows, 'somp')} | "
            f"{_mean_seconds(rows, 'somp-adaptive')} | {hl} | {rel} |"
        )
    atomic_write_text(out / "adaptive.md", "\n".join(lines) + "\n")
    plot(out, done, steps)


def plot(out: Path, done: dict, steps: int) -> None:
    """ROUGE-1 of both attackers per defense point (budget stops / no signal marked, never drawn at 0), and the
    horizon's validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, naive, adapt, loss = [], [], [], []
    for defense, _, value in POINTS:
        rows = [p for p in done["points"].values() if p["defense"] == defense and p["value"] == value]
        labels.append(f"{defense}\n{value:g}")
        for atk, dest in (("somp", naive), ("somp-adaptive", adapt)):
            src = [r[atk if atk in r or defense != "clip" else "somp"] for r in rows if atk in r or defense == "clip"]
            vals = [s["rouge1"] for s in src if s["status"] == "recovered" and s["rouge1"] is not None]
            dest.append(float(np.mean(vals)) if vals else np.nan)
        h = done.get("horizon", {}).get(f"{defense}={value:g}")
        loss.append(h["loss"] if h else np.nan)
    xs = np.arange(len(labels))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.bar(xs - 0.2, naive, 0.4, label="SOMP (naive)")
    ax.bar(xs + 0.2, adapt, 0.4, label="SOMP-adaptive")
    for i, (a, b) in enumerate(zip(naive, adapt, strict=True)):
        for x, v in ((i - 0.2, a), (i + 0.2, b)):
            if np.isnan(v):
                ax.annotate("n/a", (x, 0.02), ha="center", fontsize=7, rotation=90)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("ROUGE-1 (recovered batches)")
    ax.set_title("naive vs adaptive attacker (n/a: no recovered batch)")
    ax.legend(fontsize=8)
    base = done.get("horizon", {}).get("none=0")
    ax2.bar(xs, loss, color="tab:blue")
    if base:
        ax2.axhline(base["loss"], color="black", ls="--", label="undefended")
        ax2.axhline(base["loss_before"], color="gray", ls=":", label="before training")
        ax2.legend(fontsize=8)
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set_ylabel(f"validation loss after {steps} rounds")
    ax2.set_title("utility over the horizon (lower is better)")
    fig.tight_layout()
    atomic_write(out / "adaptive.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sweeps/adaptive"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--naive-budget-s", type=float, default=90.0)
    ap.add_argument("--adaptive-budget-s", type=float, default=400.0)
    ap.add_argument("--horizon", action="store_true", help="measure the utility over --steps rounds instead")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated defense=value points to run (default: all)")
    ap.add_argument("--attackers", default=",".join(ATTACKS), help="comma-separated attackers to run (default: both)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # forked children and a shared machine
    a.out.mkdir(parents=True, exist_ok=True)
    done = load(a.out)
    budgets = {"somp": a.naive_budget_s, "somp-adaptive": a.adaptive_budget_s}
    if not a.report_only:
        done["budgets_s"] = budgets
    ref = ModelRef(a.model)
    if not a.report_only:
        load_model(ref)
        if a.horizon:
            run_horizon(a.out, done, ref, a.batch_size, a.steps)
        else:
            only = {p.strip() for p in a.only.split(",") if p.strip()} or None
            attackers = tuple(x.strip() for x in a.attackers.split(",") if x.strip())
            run_attacks(a.out, done, ref, a.batch_size, a.batches, budgets, only, attackers)
    write_table(a.out, done, a.model, a.batch_size, done["budgets_s"], a.steps)


if __name__ == "__main__":
    main()
