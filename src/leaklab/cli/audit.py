"""`leaklab audit`: audit a system's leakage surfaces from one config file into one self-contained report."""

from __future__ import annotations

import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from leaklab.errors import LeaklabError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, invoke_without_command=True)
console = Console()
err = Console(stderr=True)

EXAMPLE = "audit-example.yaml"


@app.callback()
def audit(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="Audit config (YAML); `leaklab audit init` writes one.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: report.html, report.json and the step cache.")
    ] = Path("audit-report"),
    redact: Annotated[
        bool, typer.Option("--redact", help="Mask private and recovered texts beyond their first characters.")
    ] = False,
    cached_only: Annotated[
        bool,
        typer.Option("--cached-only", help="Write the report of the steps already cached in OUT; run nothing."),
    ] = False,
) -> None:
    """Audit a system: gradient, embedding and API-defense surfaces; writes OUT/report.html and OUT/report.json.
    Finished steps are cached in OUT, so rerunning an interrupted audit resumes it."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        raise LeaklabError("give --config AUDIT.yaml (`leaklab audit init audit.yaml` writes a commented example)")
    from leaklab.experiments.audit import load_config, run_audit

    cfg = load_config(config)
    command = shlex.join(["leaklab", *sys.argv[1:]])
    report = run_audit(cfg, out, redact=redact, cached_only=cached_only, command=command, console=err)
    for s in report["summary"]:
        value = "–" if s["value"] is None else f"{s['value']:.3f}"
        console.print(
            f"{s['title']}: [bold]{s['risk']}[/] ({s['metric']} = {value}; {s['detail']})",
            highlight=False,
            soft_wrap=True,
        )
    for n in report["not_assessed"]:
        console.print(f"not assessed: {n['title']} — {n['reason']}", highlight=False, soft_wrap=True)
    console.print(
        f"wrote {out / 'report.html'} and {out / 'report.json'} ({report['reproducibility']['duration_s']} s)",
        soft_wrap=True,
    )


@app.command("keys")
def keys(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every key of an audit config: section, name, type, default and help."""
    from leaklab.cli.common import print_rows
    from leaklab.experiments.audit.config import schema

    def cells(r: dict) -> tuple[str, str, str, str, str]:
        return r["where"], r["name"], r["type"], str(r["default"]), r["help"]

    print_rows(schema(), as_json, "audit config keys", ("section", "key", "type", "default", "help"), cells)


@app.command("init")
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the example config.")] = Path("audit.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example audit config (the packaged defaults, about 15 minutes on 2 CPU cores)."""
    from leaklab.io import atomic_write_text

    if path.exists() and not force:
        raise LeaklabError(f"'{path}' exists; pass --force to overwrite it")
    text = resources.files("leaklab.experiments.audit").joinpath(EXAMPLE).read_text("utf-8")
    atomic_write_text(path, text)
    console.print(f"wrote {path}; run: leaklab audit --config {path} --out audit-report")
