"""`leaklab gradient bench`: the attack × batch size × length grid, written to benchmarks/results/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leaklab.errors import LeaklabError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LeaklabError(f"expected comma-separated integers, got '{text}'") from None


def attack_options(items: list[str] | None) -> dict[str, dict]:
    """``["somp:max_atoms=256", "somp:budget_s=400"]`` → ``{"somp": {"max_atoms": 256, "budget_s": 400}}``."""
    from leaklab.attacks.base import parse_options

    out: dict[str, dict] = {}
    for item in items or []:
        attack, sep, pair = item.partition(":")
        if not sep or not attack or "=" not in pair:
            raise LeaklabError(f"attack option '{item}' is not of the form ATTACK:key=value")
        out.setdefault(attack, {}).update(parse_options([pair]))
    return out


@app.command("bench")
def bench_cmd(
    out: Annotated[Path, typer.Option(help="Results folder (cells/ + gradient.md + PNGs).")] = Path(
        "benchmarks/results/gradient"
    ),
    model: Annotated[str, typer.Option(help="Model.")] = "smollm2-135m",
    regimes: Annotated[str, typer.Option(help="short,long,italian,spanish,chinese,german")] = "short,long",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,16,32,64,128",
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks.")] = "somp,dager",
    batches: Annotated[int, typer.Option(help="Batches per cell.")] = 5,
    seed: Annotated[int, typer.Option(help="First batch seed.")] = 0,
    force: Annotated[bool, typer.Option(help="Redo cells that are already stored.")] = False,
    report_only: Annotated[bool, typer.Option(help="Only rebuild the table and plots from stored cells.")] = False,
    attack_option: Annotated[
        list[str] | None,
        typer.Option(
            "--attack-option",
            help="ATTACK:key=value, a non-default option of one attack (repeatable; recorded in the cell and "
            "shown in the table), e.g. somp:max_atoms=256.",
        ),
    ] = None,
) -> None:
    """Run the missing cells of the grid (resumable), then write the table, plots and target check."""
    from leaklab.bench.gradient import run_grid, write_report

    console = Console(stderr=True)
    if not report_only:
        run_grid(
            out,
            model,
            regimes.split(","),
            _ints(batch_sizes),
            attacks.split(","),
            batches,
            seed,
            force=force,
            console=console,
            options=attack_options(attack_option),
        )
    md = write_report(out)
    Console().print(md.read_text(encoding="utf-8"))
