"""``leaklab fl``: federated learning on Flower, audited."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from leaklab.cli import common

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)


def _table(summary: dict[str, Any]) -> Table:
    from leaklab.fl.report import cell, result_rows

    table = Table(title=f"leakage per round × client ({summary['defense']['name']})")
    for col in ("round", "target", "attack", "texts", "ROUGE-1", "ROUGE-2", "token F1", "outcome"):
        table.add_column(col, overflow="fold")
    for r in result_rows(summary["records"]):
        table.add_row(
            *(cell(r[k]) for k in ("round", "target", "attack", "texts", "rouge1", "rouge2", "token_f1")), r["outcome"]
        )
    return table


@app.command("simulate")
def simulate_cmd(
    out: Annotated[Path, typer.Option(help="Run folder (updates, secrets, records, results.md, leakage.png).")],
    model: common.ModelOpt = "tiny-llama",
    corpus: common.CorpusOpt = "rotten-tomatoes",
    clients: Annotated[int, typer.Option(help="Simulated clients (SuperNodes).")] = 4,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Private texts per client per round.")] = 2,
    setting: Annotated[str, typer.Option(help="fedsgd, fedavg or lora.")] = "fedsgd",
    lr: Annotated[float, typer.Option(help="Client SGD learning rate.")] = 0.01,
    local_steps: Annotated[int, typer.Option(help="Local SGD passes (fedavg, lora).")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (lora).")] = 8,
    attack: Annotated[list[str], typer.Option(help="Attack(s) run on every captured update (repeatable).")] = ["somp"],  # noqa: B006
    defense: Annotated[
        str,
        typer.Option(
            help="none, server-dp, local-dp or secagg+ with options, e.g. server-dp:noise=0.5,view=outside "
            "(listed by: leaklab fl defenses)."
        ),
    ] = "none",
    capture: Annotated[str, typer.Option(help="clients, aggregate or both.")] = "both",
    attack_clients: Annotated[int, typer.Option(help="Client updates attacked per round (0: all).")] = 0,
    attack_aggregate: Annotated[
        bool, typer.Option(help="Attack each round's aggregate (--no-attack-aggregate: store it only).")
    ] = True,
    attack_budget_s: Annotated[float, typer.Option(help="Time budget of each attack run.")] = 120.0,
    attack_after: Annotated[
        bool,
        typer.Option(
            "--attack-after/--attack-inline",
            help="Attack the stored updates after the federation (--attack-inline: as each is captured, which holds "
            "the attack's memory beside Flower's).",
        ),
    ] = True,
    min_tokens: common.MinTokensOpt = 4,
    max_tokens: common.MaxTokensOpt = 10,
    seed: Annotated[int, typer.Option(help="Seed of the private shards.")] = 0,
    val_texts: Annotated[int, typer.Option(help="Public texts the validation loss is measured on (0: none).")] = 16,
    num_cpus: Annotated[int, typer.Option(help="CPUs Ray may use.")] = 2,
    client_cpus: Annotated[float, typer.Option(help="CPUs each client actor reserves.")] = 1.0,
    as_json: common.JsonOpt = False,
) -> None:
    """Run a federation on Flower's simulation engine (Ray) and attack every captured update."""
    from leaklab.fl.config import FlRun
    from leaklab.fl.simulate import return_freed_memory, simulate

    run = FlRun.from_dict(
        {
            "model": model,
            "corpus": corpus,
            "clients": clients,
            "rounds": rounds,
            "batch_size": batch_size,
            "setting": setting,
            "lr": lr,
            "local_steps": local_steps,
            "lora_r": lora_r,
            "attacks": ",".join(attack),
            "defense": defense,
            "capture": capture,
            "attack_clients": attack_clients,
            "attack_aggregate": attack_aggregate,
            "attack_budget_s": attack_budget_s,
            "attack_after": attack_after,
            "min_tokens": min_tokens,
            "max_tokens": max_tokens,
            "seed": seed,
            "val_texts": val_texts,
            "out": str(out),
        },
        "fl simulate",
    )
    per_round = (clients if capture != "aggregate" else 0) + (capture != "clients")
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=common.console,
        disable=as_json,
    ) as bar:
        task = bar.add_task("starting Flower (Ray)", total=rounds * per_round)

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "round":
                bar.update(task, description=f"round {info['round']}/{rounds}: clients training")
            elif kind == "captured":
                bar.update(task, advance=1, description=f"round {info['round']}/{rounds}: captured {info['who']}")
            elif kind == "attacked":
                bar.update(task, description=f"round {info['round']}: {info['attack']} on {info['target']} done")
            elif kind == "utility":
                bar.update(task, description=f"round {info['round']}/{rounds}: val loss {info['val_loss']:.4f}")

        return_freed_memory()  # this process runs only the federation
        summary = simulate(run, num_cpus, client_cpus, on_event)
    for rnd, missing in summary["missing_replies"].items():
        typer.echo(
            f"warning: round {rnd}: {missing} of {clients} clients did not reply (their updates are missing from "
            "the aggregate; see Flower's log, e.g. Ray's memory monitor)",
            err=True,
        )
    if as_json:
        import json

        print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2, default=str))
        return
    common.console.print(_table(summary))
    common.console.print(f"wall time {summary['seconds']} s; run folder {out} (results.md, leakage.png)")


@app.command("defenses")
def defenses_cmd(as_json: common.JsonOpt = False) -> None:
    """List Flower's defenses that `fl simulate --defense NAME:k=v,...` runs, with their options."""
    from leaklab.fl.config import FL_DEFENSES

    common.list_entries(FL_DEFENSES, "Flower defenses", as_json)
