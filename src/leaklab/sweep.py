"""Privacy–utility sweeps: attack success against defense strength (and ε) against the victim's utility.

For each value of one defense parameter (plus an undefended baseline), ``batches`` private batches are
drawn (seeds seed, seed+1, ...), each defended update goes to the attack (Observation only), recoveries
are scored after matching, and the utility of the same update is measured on public texts. Writes
``sweep.json``, ``sweep.md`` and ``sweep.png`` into the output folder, a run folder renamed into place when
the sweep completes: an interrupted sweep keeps the points it measured in ``<out>.incomplete/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from leaklab.attacks.base import make_attack
from leaklab.defenses import defended_update, make_defense
from leaklab.defenses.utility import HORIZON_SETTINGS, HorizonOptions, horizon_utility, utility
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import attack_batch, outcome_summary, outcome_text
from leaklab.io import atomic_write, atomic_write_json, atomic_write_text
from leaklab.models import ModelRef, load_model
from leaklab.progress import step_progress
from leaklab.report.run import check_output, environment, run_folder
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


def _row(value: Any, param: str | None, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One strength value: means over the batches the attack recovered (None where it recovered none), the
    outcome counts and reasons of the others, utility over all batches."""

    def mean(key: str, src: str) -> float | None:
        vals = [b[src][key] for b in batches if b[src] and b[src].get(key) is not None]
        return float(np.mean(vals)) if vals else None

    eps = [r.get("epsilon") for r in batches[0]["defenses"] if r.get("epsilon") is not None]
    metric = "bag_f1" if any(b["kind"] == "bag" for b in batches if b["score"]) else "rouge1"
    scored = [b["score"][metric] for b in batches if b["score"]]
    outcome = outcome_summary([b["status"] for b in batches], [b["reason"] for b in batches])
    return {
        "value": value,
        "param": param,
        "epsilon": eps[0] if eps else None,
        **outcome,
        "metric": metric,
        "leak": mean(metric, "score"),
        "leak_std": float(np.std(scored)) if scored else None,
        "rouge1": mean("rouge1", "score"),
        "rouge2": mean("rouge2", "score"),
        "token_f1": mean("token_f1", "score"),
        "token_recall": mean("token_recall", "score"),
        "bag_f1": mean("bag_f1", "score"),
        "utility_loss": mean("loss", "utility"),
        "utility_loss_before": mean("loss_before", "utility"),
        "utility_accuracy": mean("accuracy", "utility"),
        "attack_seconds": float(np.mean([b["attack_seconds"] for b in batches])),
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
    horizon: HorizonOptions | None = None,
    baseline: bool = True,
    console: Console | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Attack ROUGE-1 and utility for each ``values`` of the defense's strength parameter; writes the table,
    JSON and plot into ``out`` (an existing sweep there is replaced only with ``overwrite``) and returns the
    results. ``horizon`` (default: 20 rounds; ``steps=0`` skips it) adds each point's validation loss after that
    many consecutive defended updates (the same batches at every point; fedsgd and fedavg only)."""
    console = console or Console(stderr=True)
    horizon = horizon or HorizonOptions(server_lr=server_lr, texts=utility_texts)
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
    atk = make_attack(attack, attack_options or {})
    check_output(out, overwrite)  # after the names and options, before any work
    config = {
        "kind": "defense-sweep",
        "defense": defense,
        "param": param,
        "values": list(values),
        "defense_params": fixed,
        "attack": atk.name,
        "attack_options": atk.config.to_dict(),
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
        "horizon": horizon.to_dict(),
    }
    load_model(ref)
    rows = []
    with run_folder(out, "sweep", overwrite) as run, step_progress(console) as bar:
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
                record = attack_batch(atk, obs, secret, seed=seed + b, victim_seconds=update_seconds)
                util = utility(obs, corpus, utility_texts, seed, 2, max_tokens, server_lr)
                done.append(
                    {
                        "seed": seed + b,
                        "status": record.status,
                        "kind": record.kind,
                        "reason": record.reason,
                        "score": record.aggregate,
                        "utility": util,
                        "attack_seconds": record.attack_seconds,
                        "update_seconds": update_seconds,
                        "defenses": obs.defenses,
                    }
                )
                bar.advance(task)
            row = _row(value, param, done)
            if horizon.steps > 0 and setting in HORIZON_SETTINGS:
                bar.update(task, description=f"{defense}={value}: utility over {horizon.steps} rounds")
                row["horizon"] = horizon_utility(
                    setting,
                    ref,
                    corpus,
                    batch_size,
                    seed,
                    defs,
                    horizon,
                    min_tokens,
                    max_tokens,
                    flags,
                    **(setting_options or {}),
                )
            rows.append(row)
            # every finished point is on disk at once: an interrupted sweep keeps it in <out>.incomplete/
            result = {"config": config, "rows": rows, "environment": environment()}
            write_outputs(run.path, result)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    head = (
        f"# {cfg['defense']} sweep: {cfg['attack']} on {cfg['model']['name']} · {cfg['corpus']} · "
        f"{cfg['setting']} · B={cfg['batch_size']} · {cfg['batches']} batch(es)\n\n"
        f"Utility: validation loss on {cfg['utility']['texts']} public texts after the update "
        f"(lower is better); *loss after N* is the validation loss after {cfg.get('horizon', {}).get('steps', 0)} "
        "consecutive defended updates on the same batches at every point (– where not run).\n\n"
        "A batch the attack could not run on, or found no signal in, is counted in *outcome* and left out of "
        "the means; a value with no recovered batch reads n/a, never 0.\n\n"
        "*leak* is ROUGE-1 after matching for text attacks and the bag F1 for token-set attacks.\n\n"
        f"| {cfg['param'] or 'defense'} | ε | outcome | leak | ± | ROUGE-1 | ROUGE-2 | token F1 | bag F1 | "
        "utility loss | Δ loss | loss after N | accuracy | attack s | note |\n|" + "---|" * 15 + "\n"
    )
    lines = []
    for r in result["rows"]:
        outcome = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in r["outcomes"].items())
        lines.append(
            f"| {r['value']} | {_fmt(r['epsilon'])} | {outcome} | {outcome_text(r, 'leak')} | {_fmt(r['leak_std'])} | "
            f"{_fmt(r['rouge1'])} | {_fmt(r['rouge2'])} | {_fmt(r['token_f1'])} | {_fmt(r['bag_f1'])} | "
            f"{r['utility_loss']:.4f} | "
            f"{r['utility_loss'] - r['utility_loss_before']:+.2e} | "
            f"{_fmt((r.get('horizon') or {}).get('loss'))} | {_fmt(r['utility_accuracy'])} | "
            f"{r['attack_seconds']:.1f} | {'; '.join(r['reasons'])} |"
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
    name = "bag F1" if any(r["metric"] == "bag_f1" for r in rows) else "ROUGE-1"
    r1 = [r["leak"] if r["leak"] is not None else np.nan for r in rows]
    ax.plot(xs, r1, "o-", color="tab:red", label=f"attack {name}")
    failed = [i for i, r in enumerate(rows) if r["leak"] is None]
    if failed:  # no recovered batch: a distinct marker on the axis and the outcome, never a point at 0
        ax.scatter(xs[failed], [0.02] * len(failed), marker="x", s=70, color="black", zorder=5, label="n/a (no run)")
        for i in failed:
            ax.annotate(outcome_text(rows[i], "leak").split(" (")[0], (xs[i], 0.06), fontsize=7, rotation=90)
    ax.set_ylabel(f"attack {name}", color="tab:red")
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
    ax2.scatter(dloss, r1, color="tab:purple")
    for r, d, lab in zip(rows, dloss, labels, strict=True):
        if r["leak"] is not None:
            ax2.annotate(lab.replace("\n", " "), (d, r["leak"]), fontsize=7)
        else:
            ax2.scatter([d], [0.02], marker="x", color="black")
            ax2.annotate(f"{lab.replace(chr(10), ' ')}: n/a", (d, 0.04), fontsize=7)
    ax2.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useOffset=False)
    ax2.locator_params(axis="x", nbins=5)
    ax2.set_xlabel("Δ validation loss after update (utility cost; lower is better)")
    ax2.set_ylabel(f"attack {name}")
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
