"""Privacy–utility sweeps: attack success against defense strength (and ε) against the victim's utility.

For each value of one defense parameter (plus an undefended baseline), ``batches`` private batches are
drawn (seeds seed, seed+1, ...), each defended update goes to the attack (Observation only), recoveries
are scored after matching, and the utility of the same update is measured on public texts. Writes
``sweep.json``, ``sweep.md`` and ``sweep.png`` into the output folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from leaklab.attacks.base import Recovery, make_attack, run_attack
from leaklab.defenses import defended_update, make_defense
from leaklab.defenses.utility import utility
from leaklab.errors import LeaklabError
from leaklab.evaluate import score_recovery
from leaklab.io import atomic_write, atomic_write_json, atomic_write_text
from leaklab.models import ModelRef, load_model
from leaklab.progress import step_progress
from leaklab.report.run import environment
from leaklab.threat import ThreatFlags

STRENGTH = {
    "dpsgd": "noise_multiplier",
    "clip": "max_norm",
    "gaussian": "sigma",
    "laplace": "scale",
    "topk": "fraction",
    "aggregate": "clients",
    "frozen-embeddings": None,
}


def strength_param(defense: str, param: str | None) -> str | None:
    if param is not None:
        return param
    if defense not in STRENGTH:
        make_defense(defense)  # raises the unknown-name error listing the valid defenses
    return STRENGTH.get(defense)


def _attack_batch(atk, obs, secret) -> tuple[dict[str, Any], float, str | None]:
    """Run and score; an attack that finds nothing to work with (e.g. no embedding gradient) scores 0."""
    try:
        rec = run_attack(atk, obs)
        error = None
    except LeaklabError as exc:
        rec, error = Recovery([], []), str(exc)
    return score_recovery(obs, secret, rec)["aggregate"], rec.seconds, error


def _row(value: Any, param: str | None, batches: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, src: str) -> float | None:
        vals = [b[src][key] for b in batches if b[src].get(key) is not None]
        return float(np.mean(vals)) if vals else None

    eps = [r.get("epsilon") for r in batches[0]["defenses"] if r.get("epsilon") is not None]
    return {
        "value": value,
        "param": param,
        "epsilon": eps[0] if eps else None,
        "rouge1": mean("rouge1", "score"),
        "rouge1_std": float(np.std([b["score"]["rouge1"] for b in batches])),
        "rouge2": mean("rouge2", "score"),
        "token_f1": mean("token_f1", "score"),
        "token_recall": mean("token_recall", "score"),
        "utility_loss": mean("loss", "utility"),
        "utility_loss_before": mean("loss_before", "utility"),
        "utility_accuracy": mean("accuracy", "utility"),
        "attack_seconds": float(np.mean([b["attack_seconds"] for b in batches])),
        "attack_errors": sorted({b["attack_error"] for b in batches if b["attack_error"]}),
        "defenses": batches[0]["defenses"],
        "batches": batches,
    }


def sweep(
    defense: str,
    values: Sequence[Any],
    attack: str,
    model: str | ModelRef,
    corpus: str,
    batch_size: int,
    batches: int,
    seed: int,
    out: str | Path,
    setting: str = "fedsgd",
    param: str | None = None,
    defense_params: dict[str, Any] | None = None,
    attack_options: dict[str, Any] | None = None,
    flags: ThreatFlags | None = None,
    setting_options: dict[str, Any] | None = None,
    min_tokens: int = 4,
    max_tokens: int = 32,
    utility_texts: int = 16,
    server_lr: float = 1e-3,
    baseline: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Attack ROUGE-1 and utility for each ``values`` of the defense's strength parameter; writes the table,
    JSON and plot into ``out`` and returns the results."""
    console = console or Console(stderr=True)
    ref = model if isinstance(model, ModelRef) else ModelRef(model)
    flags = flags or ThreatFlags()
    param = strength_param(defense, param)
    if param is None and len(values) > 1:
        raise LeaklabError(f"defense '{defense}' has no strength parameter: give one value (or none)")
    fixed = dict(defense_params or {})
    points: list[tuple[Any, list]] = [("none", [])] if baseline else []
    for v in values or [None]:
        params = {**fixed, **({param: v} if param is not None else {})}
        points.append((v, [make_defense(defense, **params)]))
    config = {
        "kind": "defense-sweep",
        "defense": defense,
        "param": param,
        "values": list(values),
        "defense_params": fixed,
        "attack": attack,
        "attack_options": attack_options or {},
        "model": ref.to_dict(),
        "corpus": corpus,
        "setting": setting,
        "setting_options": setting_options or {},
        "flags": flags.to_dict(),
        "batch_size": batch_size,
        "batches": batches,
        "seed": seed,
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "utility": {"texts": utility_texts, "split": "public", "server_lr": server_lr},
    }
    atk = make_attack(attack, **(attack_options or {}))
    load_model(ref)
    rows = []
    with step_progress(console) as bar:
        task = bar.add_task(f"{defense} sweep", total=len(points) * batches)
        for value, defs in points:
            done = []
            for b in range(batches):
                bar.update(task, description=f"{defense}={value}: batch {b + 1}/{batches}")
                t0 = time.perf_counter()
                obs, secret = defended_update(
                    setting,
                    ref,
                    corpus,
                    batch_size,
                    seed + b,
                    defs,
                    min_tokens,
                    max_tokens,
                    flags,
                    **(setting_options or {}),
                )
                update_seconds = time.perf_counter() - t0
                score, seconds, error = _attack_batch(atk, obs, secret)
                util = utility(obs, corpus, utility_texts, seed, 2, max_tokens, server_lr)
                done.append(
                    {
                        "seed": seed + b,
                        "score": score,
                        "utility": util,
                        "attack_seconds": seconds,
                        "update_seconds": update_seconds,
                        "attack_error": error,
                        "defenses": obs.defenses,
                    }
                )
                bar.advance(task)
            rows.append(_row(value, param, done))
            # every finished point is on disk at once: an interrupted sweep keeps what it measured
            result = {"config": config, "rows": rows, "environment": environment()}
            write_outputs(Path(out), result)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    head = (
        f"# {cfg['defense']} sweep: {cfg['attack']} on {cfg['model']['name']} · {cfg['corpus']} · "
        f"{cfg['setting']} · B={cfg['batch_size']} · {cfg['batches']} batch(es)\n\n"
        f"Utility: validation loss on {cfg['utility']['texts']} public texts after the update "
        f"(lower is better).\n\n"
        f"| {cfg['param'] or 'defense'} | ε | ROUGE-1 | ± | ROUGE-2 | token F1 | utility loss | Δ loss | "
        "accuracy | attack s | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in result["rows"]:
        lines.append(
            f"| {r['value']} | {_fmt(r['epsilon'])} | {_fmt(r['rouge1'])} | {_fmt(r['rouge1_std'])} | "
            f"{_fmt(r['rouge2'])} | {_fmt(r['token_f1'])} | {r['utility_loss']:.4f} | "
            f"{r['utility_loss'] - r['utility_loss_before']:+.2e} | "
            f"{_fmt(r['utility_accuracy'])} | {r['attack_seconds']:.1f} | {'; '.join(r['attack_errors'])} |"
        )
    return head + "\n".join(lines) + "\n"


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "∞" if math.isinf(x) else f"{x:.3g}"
    return str(x)


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: ROUGE-1 and Δ validation loss against strength (ε in labels); right: ROUGE-1 against Δ loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, rows = result["config"], result["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{r['value']}" + (f"\nε={_fmt(r['epsilon'])}" if r["epsilon"] is not None else "") for r in rows]
    xs = np.arange(len(rows))
    dloss = [r["utility_loss"] - r["utility_loss_before"] for r in rows]
    ax.plot(xs, [r["rouge1"] for r in rows], "o-", color="tab:red", label="attack ROUGE-1")
    ax.set_ylabel("attack ROUGE-1", color="tab:red")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlabel(f"{cfg['defense']} {cfg['param'] or ''}")
    twin = ax.twinx()
    twin.plot(xs, dloss, "s--", color="tab:blue", label="Δ validation loss")
    twin.set_ylabel("Δ validation loss (after − before update)", color="tab:blue")
    twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
    ax.set_title(
        f"{cfg['attack']} vs {cfg['defense']} ({cfg['model']['name']}, {cfg['setting']}, B={cfg['batch_size']})"
    )
    ax2.scatter(dloss, [r["rouge1"] for r in rows], color="tab:purple")
    for r, d, lab in zip(rows, dloss, labels, strict=True):
        ax2.annotate(lab.replace("\n", " "), (d, r["rouge1"]), fontsize=7)
    ax2.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useOffset=False)
    ax2.locator_params(axis="x", nbins=5)
    ax2.set_xlabel("Δ validation loss after update (utility cost; lower is better)")
    ax2.set_ylabel("attack ROUGE-1")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("privacy–utility")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", result)
    atomic_write_text(out / "sweep.md", markdown_table(result))
    plot(result, out / "sweep.png")
