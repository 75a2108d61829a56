"""`leaklab embed defend-eval`: privacy–utility curves of the API defenses against an adaptive attacker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def defend_eval(
    model: Annotated[str, typer.Option(help="Encoder: minilm-l6, tiny-bert or hashing.")] = "minilm-l6",
    corpus: Annotated[str, typer.Option(help="Labelled corpus (victim docs: private split).")] = "bbc-news:paragraphs",
    victims: Annotated[int, typer.Option(help="Victim documents (their vectors leak).")] = 800,
    public: Annotated[int, typer.Option(help="Attacker's public texts (training its probes).")] = 2000,
    known_pairs: Annotated[str, typer.Option(help="Victim-tenant pairs the attacker holds, comma list.")] = "0,500",
    seed: Annotated[int, typer.Option(help="Seed of sampling and noise.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<time>-defend-eval).")] = None,
) -> None:
    """Attack success (BoW probe retrained on defended vectors; NN re-identification) vs retrieval utility."""
    from leaklab.errors import LeaklabError
    from leaklab.io import atomic_write_text
    from leaklab.report import new_run_dir
    from leaklab.service.defend_eval import default_sweep, plot_curves, prepare, prior_f1, run_sweep, table_md
    from leaklab.service.encoders import load_encoder

    try:
        pairs = tuple(int(x) for x in known_pairs.split(",") if x.strip())
    except ValueError as exc:
        raise LeaklabError(f"--known-pairs must be comma-separated integers (got {known_pairs!r})") from exc
    enc = load_encoder(model)
    run = new_run_dir(out, "defend-eval")
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
