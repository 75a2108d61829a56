"""Gradient-attack benchmark: attacks × batch size × length regime, N batches per cell, resumable.

Each cell computes every batch's client update once and runs every attack on it, so attacks are compared on
identical updates. Finished cells are stored as JSON and skipped on a re-run, so a long grid can be filled
over several sessions. ``write_report`` turns the cells into a Markdown table, PNG plots and a target list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from leaklab.attacks.base import make_attack
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import attack_batch, outcome_summary, outcome_text
from leaklab.io import atomic_write_json, atomic_write_text
from leaklab.models import ModelRef, load_model
from leaklab.progress import step_progress
from leaklab.report.run import environment
from leaklab.threat import ThreatFlags, client_update


@dataclass(frozen=True)
class Regime:
    name: str
    corpus: str
    min_tokens: int
    max_tokens: int


REGIMES: dict[str, Regime] = {
    "short": Regime("short", "rotten-tomatoes", 8, 32),
    "long": Regime("long", "bbc-news:paragraphs", 64, 128),
    "italian": Regime("italian", "chatterbot:italian", 4, 32),
    "spanish": Regime("spanish", "chatterbot:spanish", 4, 32),
    "chinese": Regime("chinese", "chatterbot:chinese", 4, 32),
    "german": Regime("german", "chatterbot:german", 4, 32),
}

#: hand-written Markdown in the results folder, appended to gradient.md as it stands
NOTES = "notes.md"

SUMMARY_KEYS = ("rouge1", "rouge2", "rougeL", "token_f1", "exact_rate")


def cell_name(model: str, regime: str, batch_size: int) -> str:
    return f"{Path(model).name}-{regime}-B{batch_size}"


def run_cell(
    model: str,
    regime: Regime,
    batch_size: int,
    attacks: list[str],
    batches: int,
    seed: int,
    flags: ThreatFlags,
    console: Console,
    partial: Path | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """All attacks on the same ``batches`` client updates of one (regime, B) cell; with ``partial``, the
    finished batches are kept there after each batch and a rerun of the same cell (same code, options and
    flags) resumes after them. ``options``: non-default options per attack (recorded in the cell)."""
    ref = ModelRef(model)
    load_model(ref)
    options = {a: dict(o) for a, o in (options or {}).items() if o and a in attacks}
    atks = {a: make_attack(a, options.get(a, {})) for a in attacks}
    key = _as_json(
        {
            "model": model,
            "regime": regime.__dict__,
            "batch_size": batch_size,
            "attacks": list(attacks),
            "attack_options": options,
            "seed": seed,
            "flags": flags.to_dict(),
            "git_commit": _git_commit(),
        }
    )
    state = _resume(partial, key, console)
    per_attack: dict[str, list[dict[str, Any]]] = state.get("per_attack") or {a: [] for a in attacks}
    grad_seconds: list[float] = state.get("grad_seconds", [])
    with step_progress(console) as bar:
        task = bar.add_task(f"{regime.name} B={batch_size}", total=batches * len(attacks))
        bar.advance(task, len(grad_seconds) * len(attacks))
        for i in range(len(grad_seconds), batches):
            t0 = time.perf_counter()
            bar.update(task, description=f"{regime.name} B={batch_size} batch {i + 1}: client update")
            obs, secret = client_update(
                ref, regime.corpus, batch_size, seed + i, regime.min_tokens, regime.max_tokens, flags
            )
            grad_seconds.append(time.perf_counter() - t0)
            for name, atk in atks.items():
                bar.update(task, description=f"{regime.name} B={batch_size} batch {i + 1}: {name}")
                record = attack_batch(atk, obs, secret, batch=i, seed=seed + i)
                per_attack[name].append(
                    {
                        "seed": seed + i,
                        "status": record.status,
                        "reason": record.reason,
                        "attack_seconds": record.attack_seconds,
                        "info": record.info,
                        "tokens": record.tokens,
                        **(record.aggregate or {}),
                    }
                )
                bar.advance(task)
            if partial is not None:
                atomic_write_json(partial, {"key": key, "per_attack": per_attack, "grad_seconds": grad_seconds})
    return {
        "model": model,
        "regime": regime.__dict__,
        "batch_size": batch_size,
        "batches": batches,
        "seed": seed,
        "flags": flags.to_dict(),
        "attack_options": options,
        "gradient_seconds": float(np.mean(grad_seconds)),
        "attacks": {
            a: summarise_runs(runs) | {"git_commit": key["git_commit"], "batches": batches, "runs": runs}
            for a, runs in per_attack.items()
        },
        "environment": environment(),
        "git_commit": key["git_commit"],
    }


SAME_BATCHES = ("model", "regime", "batch_size", "seed", "flags")


def merge_cells(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the attacks of ``old`` that ``new`` did not run, when both scored the same client updates
    (same model, regime, B, seed and flags, and ``new`` ran at most ``old``'s batches: its batches are then the
    first of ``old``'s; else ``new`` alone). Every attack keeps its commit and its own batch count, so attacks
    can be run (and rerun) one at a time on one cell, an expensive one on fewer batches."""
    if any(_as_json(old.get(k)) != _as_json(new.get(k)) for k in SAME_BATCHES) or new["batches"] > old["batches"]:
        return new
    kept = {a: s for a, s in old["attacks"].items() if a not in new["attacks"]}
    for s in kept.values():
        s.setdefault("git_commit", old.get("git_commit"))
        s.setdefault("batches", old["batches"])
    opts = {a: o for a, o in old.get("attack_options", {}).items() if a in kept}
    base = new if new["batches"] == old["batches"] else old  # the cell's batches and gradient time: the most
    return base | {
        "attacks": kept | new["attacks"],
        "attack_options": opts | new.get("attack_options", {}),
        "git_commit": new["git_commit"],
    }


def attack_batches(cell: dict[str, Any], attack: str) -> int:
    """Batches ``attack`` ran on in ``cell`` (its own count when it ran on fewer than the cell's)."""
    return int(cell["attacks"][attack].get("batches", cell["batches"]))


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so stored and fresh keys compare equal."""
    return json.loads(json.dumps(obj, default=str))


def _resume(partial: Path | None, key: dict[str, Any], console: Console) -> dict[str, Any]:
    """The finished batches of an interrupted run of the same cell, or nothing."""
    if partial is None or not partial.exists():
        return {}
    try:
        state = json.loads(partial.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if state.get("key") != key or key["git_commit"] is None:
        console.print(f"[dim]not resuming {partial.name}: it comes from other code or options[/]")
        return {}
    console.print(f"[dim]resuming {partial.name} after {len(state['grad_seconds'])} finished batches[/]")
    return state


def _git_commit() -> str | None:
    """The checkout's commit, so a stored cell names the code that produced it."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the recovered runs (None where none was), with the outcome counts of the others."""
    ok = [r for r in runs if r.get("status", "recovered") == "recovered" and r.get(SUMMARY_KEYS[0]) is not None]
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in ok])) if ok else None for k in SUMMARY_KEYS}
    out |= outcome_summary([r.get("status", "recovered") for r in runs], [r.get("reason") for r in runs])
    out["attack_seconds"] = float(np.mean([r["attack_seconds"] for r in runs]))
    out["mean_tokens"] = float(np.mean([r["tokens"] for r in runs]))
    return out


def run_grid(
    out_dir: Path,
    model: str = "smollm2-135m",
    regimes: Iterable[str] = ("short", "long"),
    batch_sizes: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128),
    attacks: Iterable[str] = ("somp", "dager"),
    batches: int = 5,
    seed: int = 0,
    flags: ThreatFlags | None = None,
    force: bool = False,
    console: Console | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[Path]:
    """Run every missing cell of the grid, writing ``out_dir/cells/<cell>.json`` as each one finishes.
    ``options``: non-default options per attack name, e.g. ``{"somp": {"max_atoms": 256}}``."""
    from leaklab.errors import UnknownNameError

    console = console or Console(stderr=True)
    flags = flags or ThreatFlags()
    written = []
    for r in regimes:
        if r not in REGIMES:
            raise UnknownNameError("regime", r, list(REGIMES))
    for a in options or {}:
        if a not in attacks:
            raise LeaklabError(f"options given for attack '{a}', which is not run (attacks: {', '.join(attacks)})")
    for r in regimes:
        for b in batch_sizes:
            path = out_dir / "cells" / f"{cell_name(model, r, b)}.json"
            done = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
            todo = list(attacks)
            if done is not None and not force:
                if all(a in done["attacks"] and attack_batches(done, a) >= batches for a in attacks):
                    console.print(f"[dim]skip {path.name} (done; --force to redo)[/]")
                    continue
                if done["batches"] >= batches:  # add only the missing attacks, on the first `batches` updates
                    todo = [a for a in attacks if a not in done["attacks"] or attack_batches(done, a) < batches]
            partial = out_dir / "cells" / ".partial" / path.name
            cell = run_cell(model, REGIMES[r], b, todo, batches, seed, flags, console, partial, options)
            if done is not None:
                cell = merge_cells(done, cell)
            atomic_write_json(path, cell)
            partial.unlink(missing_ok=True)
            written.append(path)
    return written


def load_cells(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out_dir / "cells").glob("*.json"))]


def write_report(out_dir: Path, title: str = "Gradient inversion benchmark") -> Path:
    """Markdown table + ROUGE-1-vs-B plots from the stored cells (``notes.md`` of the folder appended)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = load_cells(out_dir)
    rows = []
    for c in cells:
        for a, s in c["attacks"].items():
            opts = c.get("attack_options", {}).get(a)
            label = f"{a} ({', '.join(f'{k}={v}' for k, v in sorted(opts.items()))})" if opts else a
            rows.append(
                (
                    c["regime"]["name"],
                    c["batch_size"],
                    label,
                    attack_batches(c, a),
                    s,
                    c["gradient_seconds"],
                    c["model"],
                )
            )
    order = {n: i for i, n in enumerate(REGIMES)}
    rows.sort(key=lambda r: (r[6], order.get(r[0], 99), r[1], r[2]))
    lines = [
        f"# {title}",
        "",
        "Generated by `leaklab gradient bench` from the cells in `cells/`; "
        "seconds are wall time on the machine in each cell's `environment`.",
        "",
        "| model | regime | B | attack | batches | mean tokens | ROUGE-1 | ROUGE-2 | token F1 | exact | "
        "s/batch attack | s/batch gradient |",
        "|" + "---|" * 12,
    ]
    for regime, b, a, n, s, gs, model in rows:
        if s.get("rouge1") is None:  # no recovered batch: the outcome, never a 0
            scores = f"{outcome_text(s)} | – | – | –"
        else:
            scores = f"{s['rouge1']:.3f} | {s['rouge2']:.3f} | {s['token_f1']:.3f} | {s['exact_rate']:.2f}"
        lines.append(
            f"| {model} | {regime} | {b} | {a} | {n} | {s['mean_tokens']:.0f} | {scores} | "
            f"{s['attack_seconds']:.1f} | {gs:.1f} |"
        )
    lines += ["", "## Targets (issue 3), evaluated from the cells above", ""]
    lines += [f"- {t}" for t in check_targets(cells)]
    notes = out_dir / NOTES
    if notes.exists():  # hand-written notes on the cells (settings, caveats) survive every regeneration
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    md = out_dir / "gradient.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    for regime in sorted({r[0] for r in rows}, key=lambda x: order.get(x, 99)):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for a in sorted({r[2] for r in rows if r[0] == regime}):
            pts = sorted((r[1], r[4]["rouge1"]) for r in rows if r[0] == regime and r[2] == a)
            pts = [(b, np.nan if v is None else v) for b, v in pts]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=a)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("ROUGE-1 (matched)")
        spec = REGIMES.get(regime)
        ax.set_title(f"{regime}: {spec.corpus} {spec.min_tokens}-{spec.max_tokens} tok" if spec else regime)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"gradient_rouge1_{regime}.png", dpi=120)
        plt.close(fig)
    return md


def _stat(cells: list[dict[str, Any]], regime: str, b: int, attack: str, key: str) -> float | None:
    for c in cells:
        if c["regime"]["name"] == regime and c["batch_size"] == b and attack in c["attacks"]:
            value = c["attacks"][attack][key]
            return None if value is None else float(value)
    return None


def check_targets(cells: list[dict[str, Any]]) -> list[str]:
    """Each issue-3 target as 'reached'/'missed'/'not measured', with the measured values."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    out = []
    for b in (1, 2, 4, 8):
        for a in ("somp", "dager"):
            r1, r2 = _stat(cells, "short", b, a, "rouge1"), _stat(cells, "short", b, a, "rouge2")
            state = "not measured" if r1 is None else ("reached" if min(r1, r2) >= 0.99 else "missed")
            out.append(f"B={b} short, {a}: ROUGE-1/2 >= 0.99 — {state} (R1 {fmt(r1)}, R2 {fmt(r2)})")
    s16, d16 = _stat(cells, "long", 16, "somp", "rouge1"), _stat(cells, "long", 16, "dager", "rouge1")
    measured = s16 is not None and d16 is not None
    state = ("reached" if s16 >= 0.90 and s16 >= 1.5 * d16 else "missed") if measured else "not measured"
    out.append(f"B=16 long: SOMP ROUGE-1 >= 0.90 and >= 1.5x DAGER — {state} (SOMP {fmt(s16)}, DAGER {fmt(d16)})")
    for b, goal in ((64, 0.80), (128, 0.60)):
        v = _stat(cells, "short", b, "somp", "rouge1")
        state = "not measured" if v is None else ("reached" if v >= goal else "missed")
        out.append(f"B={b} short: SOMP ROUGE-1 >= {goal:.2f} — {state} ({fmt(v)})")
    t = _stat(cells, "short", 16, "somp", "attack_seconds")
    state = "not measured" if t is None else ("reached" if t <= 120 else "missed")
    shown = "n/a" if t is None else f"{t:.1f} s"
    out.append(f"B=16 short: SOMP <= 120 s/batch (gradient excluded) — {state} ({shown})")
    langs = [
        r
        for r in ("italian", "spanish", "chinese", "german")
        if all(_stat(cells, r, b, "somp", "rouge1") is not None for b in (4, 16))
    ]
    out.append(f"multilingual rows at B=4 and B=16: {len(langs)}/4 languages measured ({', '.join(langs) or 'none'})")
    out += [baseline_target(cells, regime, b) for regime, b in BASELINE_CELLS]
    return out


#: the cells where issue 25 asks for the optimisation baselines (TAG, LAMP) next to SOMP
BASELINE_CELLS = (("short", 1), ("short", 2), ("short", 4), ("short", 8), ("long", 4))


def same_batch_rouge1(cell: dict[str, Any], attack: str, n: int) -> float | None:
    """Mean ROUGE-1 of ``attack`` over the first ``n`` batches of ``cell`` (recovered ones; None if none)."""
    runs = cell["attacks"][attack]["runs"][:n]
    vals = [r["rouge1"] for r in runs if r.get("status", "recovered") == "recovered" and r.get("rouge1") is not None]
    return float(np.mean(vals)) if vals else None


def baseline_target(cells: list[dict[str, Any]], regime: str, b: int) -> str:
    """Issue 25: SOMP ≥ TAG and ≥ LAMP, on the batches the baselines ran on."""
    cell = next((c for c in cells if c["regime"]["name"] == regime and c["batch_size"] == b), None)
    name = f"B={b} {regime}: SOMP >= TAG and LAMP (same batches)"
    if cell is None or "somp" not in cell["attacks"] or not {"tag", "lamp"} & set(cell["attacks"]):
        return f"{name} — not measured"
    parts, ok = [], True
    for a in ("tag", "lamp"):
        if a not in cell["attacks"]:
            parts.append(f"{a} not measured")
            ok = False
            continue
        n = attack_batches(cell, a)
        mine, theirs = same_batch_rouge1(cell, "somp", n), same_batch_rouge1(cell, a, n)
        ok = ok and mine is not None and (theirs is None or mine >= theirs)
        shown = "n/a" if theirs is None else f"{theirs:.3f}"
        parts.append(f"SOMP {'n/a' if mine is None else f'{mine:.3f}'} vs {a} {shown} on {n} batch(es)")
    return f"{name} — {'reached' if ok else 'missed'} ({'; '.join(parts)})"
