"""`leaklab gradient ...`: gradient inversion attacks on FedSGD updates (SOMP, DAGER, token set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leaklab.errors import LeaklabError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err = Console(stderr=True)


@app.command("attack")
def attack_cmd(
    attack: Annotated[str, typer.Option(help="Attack: somp, dager or tokenset.")] = "somp",
    model: Annotated[
        str | None,
        typer.Option(
            help="Model (packaged name, HF folder or hub name); default "
            "smollm2-135m, or the update's model with --update."
        ),
    ] = None,
    corpus: Annotated[str, typer.Option(help="Private corpus the victim batches are drawn from.")] = "rotten-tomatoes",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Texts per private batch (default 4; with --update it must agree with the update)."),
    ] = None,
    min_tokens: Annotated[int, typer.Option(help="Shortest private text, in tokens.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Longest private text, in tokens.")] = 32,
    batches: Annotated[int, typer.Option(help="Private batches to attack (seeds seed, seed+1, ...).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first batch draw.")] = 0,
    task: Annotated[str, typer.Option(help="Victim training task: next-token or classify.")] = "next-token",
    num_labels: Annotated[int, typer.Option(help="Classifier labels (classify).")] = 2,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<time>-<label>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the aggregate as JSON.")] = False,
    update: Annotated[Path | None, typer.Option(help="Attack this saved update instead of fresh batches.")] = None,
    batch_size_known: Annotated[
        bool,
        typer.Option(help="Threat model: the server learns the batch size (FedSGD servers see sample counts)."),
    ] = True,
    attack_option: Annotated[
        list[str] | None, typer.Option("--attack-option", help="k=v option of the attack, e.g. lm_weight=0.5.")
    ] = None,
) -> None:
    """Run a gradient inversion attack and score it against the private texts (matched ROUGE, token F1)."""
    from leaklab.attacks.base import parse_options
    from leaklab.evaluate import as_json as to_json
    from leaklab.evaluate import run_gradient_eval, run_update_eval, show_run
    from leaklab.models import ModelRef
    from leaklab.threat import ThreatFlags

    if batches < 1:
        raise LeaklabError(f"--batches must be at least 1, got {batches}")
    if batch_size is not None and batch_size < 1:
        raise LeaklabError(f"--batch-size must be at least 1, got {batch_size}")
    status = err if as_json else console
    options = parse_options(attack_option)
    if update is not None:
        ref = ModelRef(model, task, num_labels) if model is not None else None
        summary = run_update_eval(
            attack,
            update,
            ref,
            batch_size,
            out=out,
            console=status,
            batch_size_known=batch_size_known,
            attack_options=options,
        )
    else:
        summary = run_gradient_eval(
            attack=attack,
            model=model or "smollm2-135m",
            corpus=corpus,
            batch_size=batch_size or 4,
            batches=batches,
            seed=seed,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            task=task,
            num_labels=num_labels,
            flags=ThreatFlags(batch_size_known=batch_size_known),
            attack_options=options,
            out=out,
            console=status,
        )
    if as_json:
        print(json.dumps(to_json(summary), indent=2))
    else:
        show_run(summary, console)
