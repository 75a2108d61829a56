"""Attack evaluation loop: victim update -> attack (Observation only) -> matched scoring -> run folder."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from leaklab.attacks.base import make_attack, run_attack
from leaklab.errors import LeaklabError
from leaklab.metrics import score_batch
from leaklab.models import ModelRef, load_model
from leaklab.progress import step_progress
from leaklab.report import new_run_dir
from leaklab.threat import ThreatFlags, fedsgd_update, load_secret, load_update
from leaklab.threat.fedsgd import private_sample
from leaklab.threat.observation import Observation, Secret
from leaklab.threat.store import check_against_model

METRICS = ("rouge1", "rouge2", "rougeL", "token_f1", "exact_rate")


def score_recovery(obs: Observation, secret: Secret, rec) -> dict[str, Any]:
    """Score one batch after one-to-one matching; token metrics on the model tokenizer's ids."""
    loaded = load_model(obs.model)
    pred_ids = rec.token_ids if rec.token_ids is not None else [loaded.encode(t) for t in rec.texts]
    score = score_batch(rec.texts, list(secret.texts), pred_ids, [list(t) for t in secret.token_ids])
    return {"aggregate": score.aggregate(), "pairs": [p.to_dict() for p in score.pairs]}


def run_gradient_eval(
    attack: str,
    model: str,
    corpus: str,
    batch_size: int,
    batches: int,
    seed: int,
    min_tokens: int,
    max_tokens: int,
    task: str = "next-token",
    num_labels: int = 2,
    flags: ThreatFlags | None = None,
    attack_options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Attack ``batches`` private batches (seeds seed, seed+1, ...) and write a run folder."""
    console = console or Console(stderr=True)
    flags = flags or ThreatFlags()
    ref = ModelRef(model, task, num_labels)
    atk = make_attack(attack, **(attack_options or {}))
    with console.status(f"loading {model} and checking corpus '{corpus}'"):
        load_model(ref)
        first = private_sample(ref, corpus, batch_size, seed, min_tokens, max_tokens)  # bad corpus/lengths fail now
    run = new_run_dir(out, f"{attack}-{Path(model).name}-B{batch_size}")
    config = {
        "kind": "gradient-attack",
        "attack": attack,
        "attack_options": attack_options or {},
        "model": ref.to_dict(),
        "corpus": corpus,
        "batch_size": batch_size,
        "batches": batches,
        "seed": seed,
        "min_tokens": min_tokens,
        "max_tokens": max_tokens,
        "setting": "fedsgd",
        "flags": flags.to_dict(),
    }
    run.write_config(config)
    items: list[dict[str, Any]] = []
    with step_progress(console) as bar:
        task_id = bar.add_task(f"{attack} on {model}, B={batch_size}", total=batches)
        for i in range(batches):
            t0 = time.perf_counter()
            bar.update(task_id, description=f"batch {i + 1}/{batches}: client update")
            sample = first if i == 0 else private_sample(ref, corpus, batch_size, seed + i, min_tokens, max_tokens)
            obs, secret = fedsgd_update(ref, sample.texts, sample.labels, flags, seed + i)  # = client_update
            grad_seconds = time.perf_counter() - t0
            bar.update(task_id, description=f"batch {i + 1}/{batches}: {attack}")
            rec = run_attack(atk, obs)
            scored = score_recovery(obs, secret, rec)
            items.append(
                {
                    "batch": i,
                    "seed": seed + i,
                    "gradient_seconds": grad_seconds,
                    "attack_seconds": rec.seconds,
                    "info": rec.info,
                    **scored,
                }
            )
            run.write_items(items)
            bar.update(task_id, advance=1)
    aggregate = summarise(items)
    run.write_aggregate({**aggregate, "config": config})
    return {"run_dir": str(run.path), "aggregate": aggregate, "items": items, "config": config}


def load_checked_update(
    path: str | Path,
    model: ModelRef | None = None,
    batch_size: int | None = None,
    batch_size_known: bool = True,
) -> Observation:
    """Read a saved update for an attack: the model (``model`` or the one it names) must have every tensor
    with the same shape, the gradients must be finite, and a given ``batch_size`` must match the update's.
    ``batch_size_known=False`` withholds the recorded batch size from the attacker."""
    obs = load_update(path, check_model=False)
    if not batch_size_known:
        if batch_size is not None:
            raise LeaklabError("--batch-size grants the batch size; it cannot go with --no-batch-size-known")
        obs = replace(obs, flags=replace(obs.flags, batch_size_known=False), batch_size=None)
    check_against_model(obs, model)
    obs.check_finite()
    if model is not None and model != obs.model:
        obs = replace(obs, model=model)
    if batch_size is not None:
        if obs.batch_size is not None and batch_size != obs.batch_size:
            raise LeaklabError(
                f"--batch-size {batch_size} contradicts the update '{path}', which records a batch of {obs.batch_size}"
            )
        secret = load_secret(path)
        if obs.batch_size is None and secret is not None and len(secret) != batch_size:
            raise LeaklabError(
                f"--batch-size {batch_size} contradicts the update '{path}', which holds a batch of {len(secret)}"
            )
        if obs.batch_size is None:  # the user grants the attacker the batch size: record it as a flag
            obs = replace(obs, flags=replace(obs.flags, batch_size_known=True), batch_size=batch_size)
    return obs


def run_update_eval(
    attack: str,
    path: str | Path,
    model: ModelRef | None = None,
    batch_size: int | None = None,
    attack_options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
    batch_size_known: bool = True,
) -> dict[str, Any]:
    """Attack one saved update; score it against its ``.secret.json`` when one lies beside it."""
    console = console or Console(stderr=True)
    atk = make_attack(attack, **(attack_options or {}))
    with console.status(f"loading update {path}"):
        obs = load_checked_update(path, model, batch_size, batch_size_known)
    secret = load_secret(path)
    run = new_run_dir(out, f"{attack}-update-{Path(path).stem}")
    config = {
        "kind": "gradient-attack",
        "attack": attack,
        "attack_options": attack_options or {},
        "update": str(path),
        "model": obs.model.to_dict(),
        "corpus": None,
        "batch_size": obs.batch_size,
        "batches": 1,
        "seed": None,
        "setting": obs.setting,
        "flags": obs.flags.to_dict(),
        "scored": secret is not None,
    }
    run.write_config(config)
    with console.status(f"{attack} on {path}"):
        rec = run_attack(atk, obs)
    item: dict[str, Any] = {
        "batch": 0,
        "seed": None,
        "gradient_seconds": 0.0,
        "attack_seconds": rec.seconds,
        "info": rec.info,
        "recovered": rec.texts,
    }
    if secret is not None:
        item.update(score_recovery(obs, secret, rec))
    items = [item]
    run.write_items(items)
    aggregate = summarise(items) if secret is not None else {"batches": 1, "attack_seconds": rec.seconds}
    run.write_aggregate({**aggregate, "config": config})
    return {"run_dir": str(run.path), "aggregate": aggregate, "items": items, "config": config}


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"batches": len(items)}
    for key in METRICS:
        vals = [it["aggregate"][key] for it in items]
        out[key] = float(np.mean(vals)) if vals else 0.0
        out[f"{key}_std"] = float(np.std(vals)) if vals else 0.0
    out["attack_seconds"] = float(np.mean([it["attack_seconds"] for it in items])) if items else 0.0
    out["gradient_seconds"] = float(np.mean([it["gradient_seconds"] for it in items])) if items else 0.0
    return out


def show_run(summary: dict[str, Any], console: Console, side_by_side: int = 8) -> None:
    agg = summary["aggregate"]
    cfg = summary["config"]
    if "rouge1" not in agg:  # an update without its secret: nothing to score against
        table = Table(title=f"{cfg['attack']} on {cfg['model']['name']}: recovered texts (no secret to score)")
        table.add_column("recovered")
        for text in summary["items"][0]["recovered"]:
            table.add_row(text)
        console.print(table)
        console.print(f"run folder: {summary['run_dir']}")
        return
    source = cfg.get("update") or cfg["corpus"]
    table = Table(
        title=f"{cfg['attack']} on {cfg['model']['name']} · {source} · B={cfg['batch_size']} "
        f"· {agg['batches']} batch(es)"
    )
    for col in (
        "ROUGE-1",
        "ROUGE-2",
        "ROUGE-L",
        "token F1",
        "exact",
        "s/batch (attack)",
        "s/batch (gradient)",
    ):
        table.add_column(col, justify="right")
    table.add_row(*(f"{agg[k]:.3f}" for k in METRICS), f"{agg['attack_seconds']:.1f}", f"{agg['gradient_seconds']:.1f}")
    console.print(table)
    pairs = summary["items"][0]["pairs"] if summary["items"] else []
    if pairs:
        side = Table(title="first batch: private text vs recovered (after matching)", show_lines=True)
        side.add_column("private (secret)")
        side.add_column("recovered")
        side.add_column("R-1", justify="right")
        for p in pairs[:side_by_side]:
            side.add_row(p["true_text"], p["pred_text"] or "[dim](nothing)[/]", f"{p['rouge1']:.2f}")
        console.print(side)
    console.print(f"run folder: {summary['run_dir']}")


def as_json(summary: dict[str, Any]) -> dict[str, Any]:
    return {"run_dir": summary["run_dir"], **summary["aggregate"], "config": summary["config"]}


__all__ = [
    "as_json",
    "load_checked_update",
    "run_gradient_eval",
    "run_update_eval",
    "score_recovery",
    "show_run",
    "summarise",
]
