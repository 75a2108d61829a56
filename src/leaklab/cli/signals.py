"""`leaklab signals`: red-team reports over vector dumps (repeated embeddings, fingerprints, same source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from leaklab.errors import LeaklabError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
OutOpt = Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _texts(source: str, limit: int) -> list[str]:
    from leaklab.corpora import load_corpus

    return list(load_corpus(source).texts[:limit])


def _emit(report: dict, out: Path | None, as_json: bool) -> bool:
    if out:
        from leaklab.io import atomic_write_json

        atomic_write_json(out, report)
    if as_json:
        print(json.dumps(report, indent=2))
    return as_json


@app.command("repeated")
def repeated(
    dump: Annotated[Path | None, typer.Option(help="Vector dump (.jsonl with 'text' and 'embedding').")] = None,
    db: Annotated[Path | None, typer.Option(help="Or: a service database (query log, hashes only).")] = None,
    texts: Annotated[str | None, typer.Option(help="Or: texts (corpus name or file) to embed with --model.")] = None,
    model: Annotated[str | None, typer.Option(help="Encoder for --texts; also sets tokenizer/max_seq_len.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many texts from --texts.")] = 5000,
    tol: Annotated[float, typer.Option(help="Cosine tolerance: pairs with cosine >= 1 - tol repeat.")] = 1e-4,
    max_seq_len: Annotated[
        int | None, typer.Option(help="Encoder's max tokens (default: --model's, else 256).")
    ] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Vectors repeated across different texts, each pair with its likely cause."""
    from leaklab.models.registry import minilm_tokenizer
    from leaklab.signals import VectorSet, load_vectors, repeated_embeddings

    if db is not None:
        from leaklab.signals.repeated import repeated_in_log

        if not db.is_file():
            raise LeaklabError(f"database {db} not found")
        log_report = repeated_in_log(db)
        if not _emit(log_report, out, as_json):
            console.print(f"{log_report['groups']} returned vector(s) shared by different texts in {db}")
            for g in log_report["examples"][:20]:
                head = f"  {g['vector_hash']} x{g['distinct_texts']} texts ({g['defense']})"
                console.print(f"{head}: {g['likely_cause']}", highlight=False)
        return
    tokenizer = minilm_tokenizer()
    if dump is not None:
        vs = load_vectors(dump)
        seq = max_seq_len or 256
    elif texts and model:
        from leaklab.service.encoders import load_encoder

        enc = load_encoder(model)
        items = _texts(texts, limit)
        vs = VectorSet(enc.embed(items), items, [str(i) for i in range(len(items))])
        tokenizer, seq = enc.tokenizer, max_seq_len or enc.max_seq_len
    else:
        raise LeaklabError("give --dump FILE, --db FILE, or --texts SOURCE with --model NAME")
    report = repeated_embeddings(vs, tol, tokenizer, seq)
    if _emit(report, out, as_json):
        return
    console.print(f"{report['pairs']} repeated pair(s) among {report['vectors']} vectors (cosine >= 1 - {tol:g})")
    table = Table(title="causes")
    table.add_column("cause")
    table.add_column("pairs", justify="right")
    table.add_column("example", overflow="fold")
    for cause, n in report["by_cause"].items():
        ex = next((e for e in report["examples"] if e["cause"] == cause), None)
        table.add_row(cause, str(n), f"{ex['a'][:60]!r} ~ {ex['b'][:60]!r}: {ex['detail']}" if ex else "")
    console.print(table)


@app.command("fingerprint")
def fingerprint_cmd(
    dump: Annotated[Path, typer.Option(help="Leaked vectors (.npy or .jsonl).")],
    docs: Annotated[str, typer.Option(help="Known documents: corpus name or file.")],
    limit: Annotated[int, typer.Option(help="At most this many documents.")] = 5000,
    encoders: Annotated[str, typer.Option(help="Candidate encoders, comma-separated.")] = "minilm-l6,tiny-bert,hashing",
    threshold: Annotated[float, typer.Option(help="Cosine at which a vector is that document.")] = 0.99,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which known documents a leaked dump holds, and which encoder produced it."""
    from leaklab.service.encoders import load_encoder
    from leaklab.signals import fingerprint, load_vectors

    leak = load_vectors(dump)
    cands = {n.strip(): load_encoder(n.strip()) for n in encoders.split(",") if n.strip()}
    report = fingerprint(leak, _texts(docs, limit), cands, threshold)
    if _emit(report, out, as_json):
        return
    table = Table(title=f"encoders vs {dump.name} ({report['vectors']} vectors, {report['documents']} documents)")
    for col in ("encoder", "dim", "matched share", "median NN cosine", "spectrum L1"):
        table.add_column(col)
    for r in report["encoders"]:
        table.add_row(
            r["encoder"],
            str(r["dim"]),
            f"{r['match_share']:.1%}",
            str(r["median_nn_cosine"]),
            str(r["spectrum_l1"]),
        )
    console.print(table)
    console.print(report["verdict"])
    for p in report["present"][:10]:
        console.print(
            f"  vector {p['vector']} = doc {p['doc']} (cos {p['cosine']}): {p['text'][:80]!r}",
            highlight=False,
        )


@app.command("cross-source")
def cross_source_cmd(
    a: Annotated[Path, typer.Argument(help="First vector set (.npy or .jsonl).")],
    b: Annotated[Path, typer.Argument(help="Second vector set.")],
    mode: Annotated[str, typer.Option(help="auto, paired (rows = same texts), anchors, unpaired.")] = "auto",
    anchors: Annotated[int, typer.Option(help="The first N rows of both sets are known pairs.")] = 0,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Do two vector sets come from the same model or corpus?"""
    from leaklab.signals import cross_source, load_vectors

    report = cross_source(load_vectors(a), load_vectors(b), mode, anchors)
    if _emit(report, out, as_json):
        return
    for k, v in report.items():
        if k != "verdict":
            console.print(f"{k}: {v}", highlight=False)
    console.print(f"[bold]{report['verdict']}[/]")
