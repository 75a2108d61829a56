"""`leaklab keys`: create, list and revoke API keys of the embedding service."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
DbOpt = Annotated[Path, typer.Option(help="Service database (SQLite).")]


def _store(db: Path):
    from leaklab.service.store import Store

    return Store(db)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z" if ts else ""


@app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Unique key name (per-key limits/defenses in the config use it).")],
    db: DbOpt = Path("leaklab-service.db"),
    tenant: Annotated[str | None, typer.Option(help="Tenant of the secret rotation (default: the name).")] = None,
) -> None:
    """Create a key; the secret is printed once (only its hash is stored)."""
    rec, secret = _store(db).create_key(name, tenant)
    console.print(
        f"created key {rec.id} ({rec.name}, tenant {rec.tenant}); store it now, it is not shown again:",
        highlight=False,
    )
    print(secret)


@app.command("list")
def list_keys(
    db: DbOpt = Path("leaklab-service.db"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List keys (ids, names, tenants, state); secrets are never shown."""
    recs = _store(db).list_keys()
    if as_json:
        print(json.dumps([r.__dict__ for r in recs], indent=2))
        return
    table = Table(title=f"API keys in {db.name}")
    for col in ("id", "name", "tenant", "created", "state"):
        table.add_column(col)
    for r in recs:
        table.add_row(
            r.id, r.name, r.tenant, _when(r.created), f"revoked {_when(r.revoked)}" if r.revoked else "active"
        )
    console.print(table)


@app.command("revoke")
def revoke(
    ident: Annotated[str, typer.Argument(help="Key id or name.")], db: DbOpt = Path("leaklab-service.db")
) -> None:
    """Revoke a key: every data route answers 401 for it from the next request on."""
    rec = _store(db).revoke_key(ident)
    console.print(f"revoked key {rec.id} ({rec.name})", highlight=False)
