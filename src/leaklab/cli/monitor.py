"""`leaklab monitor report`: keys the probe detector flagged, with their evidence and log statistics."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from leaklab.errors import LeaklabError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()


def _hms(ts: float) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(ts))


def flagged_report(db: Path) -> list[dict]:
    """One row per flagged key: flags, peak score, latest features, and its query-log statistics."""
    from leaklab.service.store import Store

    if not db.is_file():
        raise LeaklabError(f"database {db} not found")
    store = Store(db)
    try:
        by_key: dict[str, dict] = {}
        for f in store.flags():
            row = by_key.setdefault(
                f["key_id"],
                {
                    "key_id": f["key_id"],
                    "name": f["name"],
                    "flags": 0,
                    "max_score": 0.0,
                    "first_flag": f["ts"],
                },
            )
            row["flags"] += 1
            row["max_score"] = max(row["max_score"], f["score"])
            row["last_flag"], row["action"], row["evidence"] = f["ts"], f["action"], f["evidence"]
        with store.lock:
            for key_id, row in by_key.items():
                n, tokens, distinct, t0, t1 = store.conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(tokens),0), COUNT(DISTINCT text_hash), MIN(ts), MAX(ts) "
                    "FROM queries WHERE key_id=?",
                    (key_id,),
                ).fetchone()
                row["log"] = {
                    "queries": n,
                    "tokens": tokens,
                    "repeated_text_share": round(1 - distinct / n, 3) if n else 0.0,
                    "queries_per_min": round(n / max((t1 or 0) - (t0 or 0), 1) * 60, 1),
                }
    except sqlite3.DatabaseError as exc:
        raise LeaklabError(f"{db}: not a leaklab service database ({exc})") from exc
    finally:
        store.close()
    return sorted(by_key.values(), key=lambda r: -r["max_score"])


@app.command("report")
def report(
    db: Annotated[Path, typer.Option(help="Service database (SQLite).")] = Path("leaklab-service.db"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List keys flagged as probing (edit chains, near-duplicates, convergence, sweeps) with the evidence."""
    rows = flagged_report(db)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no key flagged in {db}")
        return
    table = Table(title=f"flagged keys in {db.name}")
    for col in ("key", "flags", "max score", "action", "evidence (feature shares in the window)", "log"):
        table.add_column(col, overflow="fold")
    for r in rows:
        ev = r["evidence"]
        feats = ", ".join(f"{k}={v:.2f}" for k, v in sorted(ev["features"].items(), key=lambda kv: -kv[1]) if v)
        log = r["log"]
        table.add_row(
            f"{r['name']} ({r['key_id']})",
            str(r["flags"]),
            f"{r['max_score']:.2f}",
            r["action"],
            f"{feats} after {ev['queries']} queries; last {_hms(r['last_flag'])}",
            f"{log['queries']} queries, {log['tokens']} tokens, {log['queries_per_min']}/min, "
            f"repeated {log['repeated_text_share']:.0%}",
        )
    console.print(table)
