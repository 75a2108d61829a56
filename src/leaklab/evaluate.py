"""Gradient-attack runs: victim update → the runner (attack on the Observation only, scoring) → run folder."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from leaklab.attacks.base import make_attack
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import BAG_METRICS, TEXT_METRICS, attack_batch, outcome_text, summarise
from leaklab.models import ModelRef, load_model
from leaklab.progress import step_progress
from leaklab.report import check_output, run_folder
from leaklab.threat import ThreatFlags, fedsgd_update, load_secret, load_update
from leaklab.threat.fedsgd import private_sample
from leaklab.threat.observation import Observation
from leaklab.threat.store import check_against_model, expected_texts


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Attack ``batches`` private batches (seeds seed, seed+1, ...) and write a run folder (renamed into place
    when complete; an existing run at ``out`` is replaced only with ``overwrite``)."""
    console = console or Console(stderr=True)
    flags = flags or ThreatFlags()
    ref = ModelRef(model, task, num_labels)
    atk = make_attack(attack, attack_options or {})
    if out is not None:
        check_output(out, overwrite)  # before any work
    with console.status(f"loading {model} and checking corpus '{corpus}'"):
        load_model(ref)
        first = private_sample(ref, corpus, batch_size, seed, min_tokens, max_tokens)  # bad corpus/lengths fail now
    with run_folder(out, f"{attack}-{Path(model).name}-B{batch_size}", overwrite) as run:
        config = {
            "kind": "gradient-attack",
            "attack": atk.name,
            "attack_options": atk.config.to_dict(),
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
                bar.update(task_id, description=f"batch {i + 1}/{batches}: {attack}")
                victim_seconds = time.perf_counter() - t0
                record = attack_batch(atk, obs, secret, batch=i, seed=seed + i, victim_seconds=victim_seconds)
                items.append(record.to_dict())
                run.write_items(items)
                bar.update(task_id, advance=1)
        aggregate = summarise(items)
        run.write_aggregate({**aggregate, "config": config})
    return {"run_dir": str(run.path), "aggregate": aggregate, "items": items, "config": config}


def load_checked_update(
    path: str | Path,
    model: ModelRef | str | None = None,
    batch_size: int | None = None,
    batch_size_known: bool = True,
    task: str | None = None,
    num_labels: int | None = None,
) -> Observation:
    """Read a saved update for an attack. Its header and secret are schema-checked and must agree; the model
    (``model`` or the one it names; a bare name keeps the update's task and labels) must have every tensor
    with the same shape; a given ``task``, ``num_labels`` or ``batch_size`` must match the update's.
    ``batch_size_known=False`` withholds the recorded batch size from the attacker."""
    obs = load_update(path, check_model=False)
    load_secret(path, obs)  # a secret that contradicts the header fails here, before any work
    ref = _model_for(obs, model, task, num_labels, path)
    if not batch_size_known:
        if batch_size is not None:
            raise LeaklabError("--batch-size grants the batch size; it cannot go with --no-batch-size-known")
        obs = replace(obs, flags=replace(obs.flags, batch_size_known=False), batch_size=None)
    check_against_model(obs, ref)
    if ref != obs.model:
        obs = replace(obs, model=ref)
    if batch_size is not None:
        if obs.batch_size is not None and batch_size != obs.batch_size:
            raise LeaklabError(
                f"--batch-size {batch_size} contradicts the update '{path}', which records a batch of {obs.batch_size}"
            )
        secret = load_secret(path)
        if obs.batch_size is None and secret is not None and len(secret) != expected_texts(batch_size, obs.meta):
            raise LeaklabError(
                f"--batch-size {batch_size} contradicts the update '{path}', which holds a batch of {len(secret)}"
            )
        if obs.batch_size is None:  # the user grants the attacker the batch size: record it as a flag
            obs = replace(obs, flags=replace(obs.flags, batch_size_known=True), batch_size=batch_size)
    return obs


def _model_for(
    obs: Observation, model: ModelRef | str | None, task: str | None, num_labels: int | None, path: str | Path
) -> ModelRef:
    """The model to attack with: the update's, renamed by a bare ``model`` name; a task or label count that
    differs from the one the update was computed for is refused."""
    ref = (
        ModelRef(model, obs.model.task, obs.model.num_labels, obs.model.init_seed) if isinstance(model, str) else model
    )
    ref = ref or obs.model
    for given, what in ((task, "task"), (num_labels, "num_labels")):
        if given is not None and given != getattr(ref, what):
            raise LeaklabError(
                f"--{what.replace('_', '-')} {given} contradicts the update '{path}', computed for a model with "
                f"{what} {getattr(obs.model, what)}"
            )
    if ref.task != obs.model.task:
        raise LeaklabError(
            f"model task {ref.task} contradicts the update '{path}', computed for a {obs.model.task} model"
        )
    return ref


def run_update_eval(
    attack: str,
    path: str | Path,
    model: ModelRef | str | None = None,
    batch_size: int | None = None,
    attack_options: dict[str, Any] | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
    batch_size_known: bool = True,
    overwrite: bool = False,
    task: str | None = None,
    num_labels: int | None = None,
) -> dict[str, Any]:
    """Attack one saved update; score it against its ``.secret.json`` when one lies beside it. The run folder
    is renamed into place when complete; an existing run at ``out`` is replaced only with ``overwrite``."""
    console = console or Console(stderr=True)
    atk = make_attack(attack, attack_options or {})
    if out is not None:
        check_output(out, overwrite)  # before any work
    with console.status(f"loading update {path}"):
        obs = load_checked_update(path, model, batch_size, batch_size_known, task, num_labels)
    secret = load_secret(path)
    with run_folder(out, f"{attack}-update-{Path(path).stem}", overwrite) as run:
        config = {
            "kind": "gradient-attack",
            "attack": atk.name,
            "attack_options": atk.config.to_dict(),
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
            record = attack_batch(atk, obs, secret, batch=0)
        items = [record.to_dict()]
        run.write_items(items)
        aggregate = summarise(items)
        run.write_aggregate({**aggregate, "config": config})
    return {"run_dir": str(run.path), "aggregate": aggregate, "items": items, "config": config}


def show_run(summary: dict[str, Any], console: Console, side_by_side: int = 8) -> None:
    """The outcome table (scores, or 'n/a: could not run (reason)'), then the first batch side by side."""
    agg, cfg, items = summary["aggregate"], summary["config"], summary["items"]
    source = cfg.get("update") or cfg["corpus"]
    title = f"{cfg['attack']} on {cfg['model']['name']} · {source} · {cfg.get('setting', 'fedsgd')}"
    title += f" · B={cfg['batch_size']} · {agg['batches']} batch(es)"
    if agg["scored_batches"] == 0 and agg["status"] == "recovered":  # an update without its secret
        table = Table(title=f"{title}: recovered texts (no secret to score)")
        table.add_column("recovered")
        for text in items[0]["recovered"]:
            table.add_row(text)
    elif agg["status"] != "recovered":
        table = Table(title=title)
        table.add_column("outcome")
        table.add_row(outcome_text(agg))
    else:
        kinds = {it["kind"] for it in items if it["status"] == "recovered"}
        metrics = BAG_METRICS if kinds == {"bag"} else TEXT_METRICS
        heads = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "token_f1": "token F1"}
        heads |= {"exact_rate": "exact", "bag_precision": "bag P", "bag_recall": "bag R", "bag_f1": "bag F1"}
        heads |= {"bag_distinct_recall": "distinct tokens found"}
        table = Table(title=title)
        for key in metrics:
            table.add_column(heads[key], justify="right")
        table.add_column("s/batch (attack)", justify="right")
        table.add_column("s/batch (victim)", justify="right")
        table.add_row(
            *(outcome_text(agg, k) for k in metrics), f"{agg['attack_seconds']:.1f}", f"{agg['victim_seconds']:.1f}"
        )
        failed = {k: v for k, v in agg["outcomes"].items() if k != "recovered"}
        if failed:
            table.caption = f"not in the means: {failed} ({'; '.join(agg['reasons'])})"
    console.print(table)
    pairs = items[0]["pairs"] if items else []
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
    "show_run",
]
