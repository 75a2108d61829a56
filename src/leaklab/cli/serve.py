"""`leaklab serve`: run the embedding service with uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leaklab.errors import LeaklabError


def serve(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "--encoder",
            help="Encoder to serve: minilm-l6, tiny-bert, hashing, or a sentence-transformers / HF encoder folder.",
        ),
    ] = "minilm-l6",
    db: Annotated[Path, typer.Option(help="SQLite database (keys, query log); created if missing.")] = Path(
        "leaklab-service.db"
    ),
    config: Annotated[
        Path | None, typer.Option(help="Service config (YAML or JSON): limits, defenses, monitor.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve embeddings (OpenAI shape) and document search with keys, quotas, defenses and monitoring."""
    import uvicorn

    from leaklab.service.server import build_app

    if not 0 < port < 65536:
        raise LeaklabError(f"port must be 1..65535 (got {port})")
    app = build_app(model, db, config)
    typer.echo(f"serving {model} on http://{host}:{port} (db {db})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
