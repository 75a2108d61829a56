"""What the command groups share: option types and the listing of registry entries and table rows."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from leaklab.core import Registry

console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ModelOpt = Annotated[str, typer.Option(help="Packaged model name, HF folder, GGUF file or hub name.")]
CorpusOpt = Annotated[str, typer.Option(help="Corpus name (name:variant), file, or hf:dataset.")]
UpdateOutOpt = Annotated[Path, typer.Option(help="Update file to write (.safetensors).")]
TaskOpt = Annotated[str, typer.Option(help="Victim training task: next-token or classify.")]
NumLabelsOpt = Annotated[int, typer.Option(help="Classifier labels (classify).")]
MinTokensOpt = Annotated[int, typer.Option(help="Shortest text, in tokens.")]
MaxTokensOpt = Annotated[int, typer.Option(help="Longest text, in tokens.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing --out (otherwise it is refused).")]


def print_rows(
    rows: list[dict[str, Any]],
    as_json: bool,
    title: str,
    columns: Sequence[str],
    cells: Callable[[dict], Sequence[str]],
) -> None:
    """``rows`` as JSON, or as a table with ``columns`` filled by ``cells(row)``."""
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*cells(r))
    console.print(table)


def list_entries(registry: Registry, title: str, as_json: bool, **columns: Callable[[Any], str]) -> None:
    """Each entry of ``registry`` with its help and options (type, default, help); ``columns`` maps an extra
    column's name to what it shows of the entry (e.g. ``side=lambda e: e.extra["side"]``)."""
    entries = list(registry.entries())
    rows = [{**e.describe(), **{k: f(e) for k, f in columns.items()}} for e in entries]

    def cells(r: dict) -> list[str]:
        opts = "\n".join(f"{o['name']} ({o['type']}, default {o['default']}): {o['help']}" for o in r["options"])
        return [r["name"], *(str(r[k]) for k in columns), opts or "none", r["help"]]

    print_rows(rows, as_json, title, ["name", *columns, "options (type, default): help", "what it does"], cells)
