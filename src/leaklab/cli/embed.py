"""`leaklab embed ...`: embedding inversion attacks, trained inverters, the benchmark and API-defense evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from leaklab.errors import LeaklabError, UnknownNameError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()

INVERTERS = ("bow", "decoder")
ATTACKS_HELP = "{attacks}"  # filled from the attack registry when the help is shown (importing it is slow)


class RegistryHelp(TyperCommand):
    """A command whose option help texts name the registered attacks (``{attacks}``), looked up only when the
    help is shown."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from leaklab.attacks.embedding.registry import EMBED_ATTACKS

        for param in self.params:
            help_text = getattr(param, "help", None)
            if help_text and ATTACKS_HELP in help_text:
                param.help = help_text.replace(ATTACKS_HELP, EMBED_ATTACKS.help_names())
        super().format_help(ctx, formatter)


def load_vectors(path: Path) -> np.ndarray:
    """Leaked vectors from .npy, .json (list of lists or {"data": [{"embedding": [...]}]}) or .jsonl."""
    if not path.exists():
        raise LeaklabError(f"vector file '{path}' does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise LeaklabError(f"vector file '{path}': use .npy, .json or .jsonl")
    except (ValueError, OSError) as exc:
        raise LeaklabError(f"vector file '{path}' is unreadable: {exc}") from None
    if isinstance(rows, dict):
        rows = rows.get("data", [])
    rows = [r["embedding"] if isinstance(r, dict) else r for r in rows]
    if not rows:
        raise LeaklabError(f"vector file '{path}' holds no vectors")
    try:
        return np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise LeaklabError(f"vector file '{path}': rows have different lengths") from None


def _scenario(
    encoder: str,
    corpus: str,
    n: int,
    seed: int,
    min_tokens: int,
    max_tokens: int,
    api_key: str | None,
    public_limit: int | None = None,
):
    from leaklab.attacks.embedding.registry import Scenario

    if public_limit is not None and public_limit < 1:
        raise LeaklabError(f"--public-limit must be at least 1, got {public_limit}")
    return Scenario(encoder, corpus, n, seed, min_tokens, max_tokens, public_limit, api_key=api_key)


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    for key, value in metrics.items():
        if key == "per_item_f1":
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value, default=str)
        table.add_row(key, shown if len(shown) < 400 else shown[:400] + " …")
    console.print(table)


def attack_rows() -> list[dict[str, Any]]:
    """Each registered attack: name, help, what it may access, and its options (name, type, default, help)."""
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS

    return [e.describe() | {"access": e.extra.get("access", "")} for e in EMBED_ATTACKS.entries()]


def _as_typed(value: Any) -> str:
    """A default as it is written after ``-o name=``."""
    if isinstance(value, tuple | list):
        value = ",".join(str(v) for v in value)
    return "none" if value is None else str(value) if value != "" else "''"


@app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the embedding attacks, what each may access, and its options (`-o key=value`)."""
    rows = attack_rows()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="embedding attacks (options: -o name=value)", expand=True)
    table.add_column("attack", overflow="fold", ratio=1)
    table.add_column("options (default): help", overflow="fold", ratio=2)
    for row in rows:
        opts = "\n".join(f"[bold]{o['name']}[/] ({_as_typed(o['default'])}): {o['help']}" for o in row["options"])
        table.add_row(f"[bold]{row['name']}[/]\n{row['help']}\n[dim]access: {row['access']}[/]", opts or "none")
    console.print(table)


@app.command("attack", cls=RegistryHelp)
def attack_cmd(
    attack: Annotated[str, typer.Option("--attack", help=f"Attack: {ATTACKS_HELP} (see `leaklab embed list`).")],
    encoder: Annotated[
        str, typer.Option(help="minilm-l6, tiny-bert, an encoder folder or http(s)://endpoint[#model].")
    ] = "minilm-l6",
    corpus: Annotated[
        str, typer.Option(help="Corpus of the private targets and public attacker data.")
    ] = "rotten-tomatoes",
    n: Annotated[int, typer.Option(help="Private targets (documents, members).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the target draw and the attack.")] = 0,
    min_tokens: Annotated[int, typer.Option(help="Shortest text, in tokens.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Longest text, in tokens.")] = 32,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Attack option KEY=VALUE (see `leaklab embed list`).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LEAKLAB_API_KEY", help="API key of an http encoder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the run record here (JSON).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out record.")] = False,
    public_limit: Annotated[
        int | None, typer.Option(help="Use at most this many public texts as attacker data (default: all).")
    ] = None,
) -> None:
    """Run one attack against a victim built from private texts, and score it.

    Exit code 3: the attack could not run on this scenario, or found no signal (the reason is printed; never a
    score of 0)."""
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS
    from leaklab.experiments.runner import record_outcome, run_embedding
    from leaklab.io import atomic_write_json
    from leaklab.report import check_output

    cfg = EMBED_ATTACKS.get(attack).options(option or [])  # a bad name or option fails before any work
    if out:
        check_output(out, overwrite, "run record")
    scn = _scenario(encoder, corpus, n, seed, min_tokens, max_tokens, api_key, public_limit)
    with console.status(f"running {attack} on {encoder}"):
        record = run_embedding(attack, scn, cfg)
    title = f"{attack} on {encoder} ({corpus}, n={n})"
    if record.aggregate is None:
        console.print(f"{title}: {record_outcome(record.to_dict())}", highlight=False, markup=False, soft_wrap=True)
    else:
        _print_metrics(record.aggregate, title)
        usage = record.info.get("usage", {})
        console.print(f"usage: {usage}  seconds: {record.attack_seconds}  flags: {record.observation['flags']}")
    for ex in record.pairs[:3]:
        console.print(f"[dim]true:[/] {ex['true_text']}\n[dim]got: [/] {ex['pred_text']}", highlight=False)
    if out:
        atomic_write_json(out, record.to_dict())
        console.print(f"wrote {out}")
    if record.status != "recovered":
        raise SystemExit(3)  # not typer.Exit: the entry point runs typer with standalone_mode=False, which drops it


@app.command("train")
def train_cmd(
    inverter: Annotated[str, typer.Option(help="bow or decoder.")],
    out: Annotated[Path, typer.Option(help="Folder to save the inverter (safetensors + config.json).")],
    encoder: Annotated[str, typer.Option(help="Encoder whose vectors it inverts.")] = "minilm-l6",
    corpus: Annotated[str, typer.Option(help="Corpus (its public split is the training data).")] = "rotten-tomatoes",
    max_tokens: Annotated[int, typer.Option(help="Longest training text, in tokens.")] = 32,
    train_seconds: Annotated[float, typer.Option(help="Training time budget.")] = 120.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Training option KEY=VALUE of the bow or decoder attack.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LEAKLAB_API_KEY", help="API key of an http encoder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Train an inverter on public (text, vector) pairs only, and save it (the folder appears complete or not
    at all)."""
    from leaklab.core import parse_pairs
    from leaklab.report import check_output, run_folder

    if inverter not in INVERTERS:
        raise UnknownNameError("inverter", inverter, list(INVERTERS))
    pairs = parse_pairs(option) | {"train_seconds": train_seconds}
    if inverter == "bow":
        from leaklab.attacks.embedding.bow import BowTraining, train_bow

        opts, train = BowTraining.from_dict(pairs, "bow inverter"), train_bow
    else:
        from leaklab.attacks.embedding.decoder import DecoderTraining, train_decoder

        opts, train = DecoderTraining.from_dict(pairs, "decoder inverter"), train_decoder
    check_output(out, overwrite)
    scn = _scenario(encoder, corpus, 1, seed, 1, max_tokens, api_key)
    with console.status(f"training a {inverter} inverter on {encoder} (≤ {train_seconds:.0f} s)"):
        inv, info = train(scn.public_data(), opts, scn.victim)
        with run_folder(out, "inverter", overwrite) as run:
            inv.save(run.path)
    console.print(f"saved {inverter} inverter to {out}: {info}")


@app.command("invert")
def invert_cmd(
    inverter_dir: Annotated[Path, typer.Option("--inverter", help="Folder of a saved inverter.")],
    vectors: Annotated[Path, typer.Option(help="Leaked vectors (.npy, .json, .jsonl).")],
    encoder: Annotated[
        str | None,
        typer.Option(help="Black-box encoder: the decoder's correction; for any inverter, its dimension is checked."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Correction steps (decoder, needs --encoder).")] = 0,
    api_key: Annotated[str | None, typer.Option(envvar="LEAKLAB_API_KEY", help="API key of an http encoder.")] = None,
) -> None:
    """Invert leaked vectors with a saved inverter; prints one recovered text per line."""
    from leaklab.attacks.embedding.registry import INVERTER_CONFIG

    cfg_path = inverter_dir / INVERTER_CONFIG
    if not cfg_path.exists():
        raise LeaklabError(f"'{inverter_dir}' is not a saved inverter (no {INVERTER_CONFIG})")
    kind = json.loads(cfg_path.read_text(encoding="utf-8")).get("kind")
    vecs = load_vectors(vectors)
    if steps > 0 and not encoder:
        raise LeaklabError("--steps needs --encoder: correction re-embeds hypotheses through the black-box encoder")
    if kind not in INVERTERS:
        raise UnknownNameError("inverter kind", str(kind), list(INVERTERS))
    from leaklab.attacks.embedding.registry import check_inverter_encoder
    from leaklab.encoders import load_encoder

    enc = load_encoder(encoder, api_key=api_key) if encoder else None
    if kind == "bow":  # the bag-of-words inverter does not query: an encoder only checks the dimension
        from leaklab.attacks.embedding.bow import BagOfWordsInverter

        inv = BagOfWordsInverter.load(inverter_dir)
    else:
        from leaklab.attacks.embedding.decoder import load_decoder
        from leaklab.models.registry import minilm_tokenizer

        inv = load_decoder(inverter_dir, getattr(enc, "tokenizer", None) or minilm_tokenizer())
    if enc is not None:
        check_inverter_encoder(inv, str(inverter_dir), str(encoder), enc.dim)
    if kind == "bow":
        texts = inv.invert(vecs)
    else:
        texts = inv.invert(vecs, enc, steps=steps if enc else 0)
        if enc is not None:
            console.print(f"[dim]correction queries: {enc.usage.queries}[/]")
    for t in texts:
        print(t)


@app.command("bench")
def bench_cmd(
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("benchmarks/results"),
    quick: Annotated[bool, typer.Option(help="Tiny encoder, few targets (smoke test).")] = False,
    only: Annotated[str | None, typer.Option(help="Comma-separated attacks to run (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    render: Annotated[bool, typer.Option(help="Only rewrite the table and plots from the results JSON.")] = False,
) -> None:
    """Benchmark every attack (minilm-l6, rotten-tomatoes ≤ 32 tokens); writes embedding.md/.json + plots.
    With --only, the named entries are rerun and merged into the existing results."""
    from leaklab.embed_bench import rerender, run_bench

    if render:
        paths = rerender(out, quick)
    else:
        paths = run_bench(out, quick=quick, only=only.split(",") if only else None, seed=seed, console=console)
    for p in paths:
        console.print(f"wrote {p}")


@app.command("defend-eval")
def defend_eval(
    model: Annotated[str, typer.Option(help="Encoder: minilm-l6, tiny-bert or hashing.")] = "minilm-l6",
    corpus: Annotated[str, typer.Option(help="Labelled corpus (victim docs: private split).")] = "bbc-news:paragraphs",
    victims: Annotated[int, typer.Option(help="Victim documents (their vectors leak).")] = 800,
    public: Annotated[int, typer.Option(help="Attacker's public texts (training its probes).")] = 2000,
    known_pairs: Annotated[str, typer.Option(help="Victim-tenant pairs the attacker holds, comma list.")] = "0,500",
    seed: Annotated[int, typer.Option(help="Seed of sampling and noise.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<time>-defend-eval).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out run folder.")] = False,
) -> None:
    """Attack success (BoW probe retrained on defended vectors; NN re-identification) vs retrieval utility."""
    from leaklab.errors import LeaklabError
    from leaklab.io import atomic_write_text
    from leaklab.report import check_output, run_folder
    from leaklab.service.defend_eval import default_sweep, plot_curves, prepare, prior_f1, run_sweep, table_md
    from leaklab.service.encoders import load_encoder

    try:
        pairs = tuple(int(x) for x in known_pairs.split(",") if x.strip())
    except ValueError as exc:
        raise LeaklabError(f"--known-pairs must be comma-separated integers (got {known_pairs!r})") from exc
    if out is not None:
        check_output(out, overwrite)
    enc = load_encoder(model)
    with run_folder(out, "defend-eval", overwrite) as run:
        with console.status(f"embedding {victims} victim and {public} public texts of {corpus} with {model}"):
            data = prepare(enc.embed, corpus, victims, public, seed)
        sweep = default_sweep()
        with console.status("sweeping defenses") as status:
            rows = run_sweep(data, sweep, seed, pairs, progress=lambda s: status.update(f"defense {s}"))
        prior = prior_f1(data)
        config = {
            "model": model,
            "corpus": corpus,
            "victims": victims,
            "public": public,
            "known_pairs": list(pairs),
            "seed": seed,
            "threat": {
                "attacker_key_tenant": "attacker",
                "adaptive_retraining": True,
                "candidate_pool_contains_victim_docs": True,
            },
        }
        run.write_config(config)
        run.write_items(rows)
        run.write_aggregate({"prior_bow_token_f1": prior, "points": len(rows)})
        plot_curves(rows, prior, run.path / "privacy_utility.png", f"{model} on {corpus}: adaptive attacker vs utility")
        atomic_write_text(
            run.path / "privacy_utility.md", table_md(rows) + f"\nprior BoW token F1 (no vector): {prior:.3f}\n"
        )
        console.print(table_md(rows), highlight=False, markup=False)
    console.print(f"wrote {run.path}/privacy_utility.png and .md")
