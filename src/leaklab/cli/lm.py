"""``leaklab lm``: fine-tuned causal LMs as victims — fine-tune with canaries (optionally under DP), attack
membership and extraction, and ask of one's own fine-tune "was this text in it?"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from leaklab.cli import common
from leaklab.errors import LeaklabError

app = typer.Typer(no_args_is_help=True)
console = Console()

OptionsOpt = Annotated[list[str] | None, typer.Option("--option", "-o", help="Extra option key=value (repeatable).")]
BaseOpt = Annotated[
    str | None, typer.Option(help="Base model the fine-tune started from (packaged name or folder): grants it.")
]
PublicOpt = Annotated[
    str | None, typer.Option(help="Public texts of the same distribution (corpus name or file): grants them.")
]


@app.command("attacks")
def attacks_cmd(as_json: common.JsonOpt = False) -> None:
    """List the membership attacks, their options and the grants each needs."""
    from leaklab.attacks.membership import MEMBERSHIP_ATTACKS

    common.list_entries(
        MEMBERSHIP_ATTACKS, "LM membership attacks", as_json, needs=lambda e: ", ".join(e.extra["needs"]) or "-"
    )


@app.command("finetune")
def finetune_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the fine-tuned model to (Secret beside it).")],
    model: common.ModelOpt = "smollm2-135m",
    corpus: common.CorpusOpt = "rotten-tomatoes",
    members: Annotated[int, typer.Option(help="Member texts from the private split.")] = 500,
    method: Annotated[str, typer.Option(help="full or lora.")] = "full",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    epsilon: Annotated[float | None, typer.Option(help="DP-SGD target ε (Opacus); default: no DP.")] = None,
    canaries: Annotated[str, typer.Option(help="Canary insertion counts, e.g. 1,4,16 (empty: none).")] = "",
    seed: Annotated[int, typer.Option(help="Seed of the draw and of training.")] = 0,
    option: OptionsOpt = None,
) -> None:
    """Fine-tune a causal LM on members drawn from a corpus's private split (full or LoRA, optional DP-SGD and
    canaries) and save it as a Hugging Face folder."""
    from leaklab.core import parse_pairs
    from leaklab.progress import step_progress
    from leaklab.threat.finetune import FinetuneConfig, finetune, secret_path

    values = {
        "model": model,
        "corpus": corpus,
        "members": members,
        "method": method,
        "epochs": epochs,
        "epsilon": epsilon,
        "canary_repeats": canaries,
        "seed": seed,
    }
    extra = parse_pairs(option)
    clash = sorted(set(extra) & set(values))
    if clash:
        raise LeaklabError(f"option {clash[0]} has its own flag (--{clash[0].replace('_', '-')})")
    cfg = FinetuneConfig.from_dict({**values, **extra})
    with step_progress(console) as bar:
        task = bar.add_task("fine-tuning", total=None)

        def show(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        record = finetune(cfg, out, show)
    dp = record.get("dp")
    console.print(
        f"wrote {out} ({record['texts']} training texts, {record['steps']} steps, {record['seconds']:.0f} s"
        + (f", ε = {dp['epsilon']:.2f} at δ = {dp['delta']:g}" if dp else "")
        + f") and {secret_path(out)} (members, non-members, canaries: for scoring)"
    )


def _access(model: str, base: str | None, public: str | None, shadow_dir: Path | None):
    from leaklab.attacks.membership import LMAccess
    from leaklab.models.causal import load_causal_lm

    target = load_causal_lm(model)
    base_lm = load_causal_lm(base) if base else None
    texts = None
    if public:
        from leaklab.corpora import load_corpus
        from leaklab.corpora.sampling import split_of

        corpus = load_corpus(public)
        own_file = Path(public).is_file()  # a user's file is public as a whole; a corpus gives its public split
        texts = corpus.texts if own_file else tuple(t for t in corpus.texts if split_of(t) == "public")
    return LMAccess(target, base_lm, texts, shadow_dir)


@app.command("attack")
def attack_cmd(
    model: Annotated[str, typer.Option(help="Fine-tuned folder written by 'lm finetune' (its Secret beside it).")],
    base: BaseOpt = None,
    public: PublicOpt = None,
    attack: Annotated[str, typer.Option(help="Comma list of attacks (see 'lm attacks').")] = "loss,zlib,min-k,"
    "min-k++,reference,rmia",
    out: Annotated[Path | None, typer.Option(help="JSON file for the full results.")] = None,
    shadow_dir: Annotated[Path | None, typer.Option(help="Cache folder of RMIA's shadow models.")] = None,
    option: OptionsOpt = None,
) -> None:
    """Every membership attack on a fine-tune's members vs non-members (AUC, TPR@1%/0.1% FPR with bootstrap
    intervals), canary exposure and extraction, and held-out perplexity."""
    from leaklab.core import parse_spec
    from leaklab.experiments.lm_membership import evaluate_membership
    from leaklab.io import atomic_write_json
    from leaklab.threat.finetune import load_secret

    secret = load_secret(model)
    names = [a.strip() for a in attack.split(",") if a.strip()]
    options = {}
    for item in option or []:  # attack:key=value
        name, pairs = parse_spec(item, "attack option")
        options[name] = pairs
    access = _access(model, base, public, shadow_dir)
    with console.status("scoring") as status:
        result = evaluate_membership(access, secret, names, options, progress=status.update)
    show_result(result)
    if out:
        atomic_write_json(out, result)
        console.print(f"wrote {out}")


def show_result(result: dict) -> None:
    table = Table(title=f"membership: {result['members']} members vs {result['non_members']} non-members")
    for col in ("attack", "AUC [95% CI]", "TPR@1%FPR", "TPR@0.1%FPR"):
        table.add_column(col)
    for r in result["attacks"]:
        if r["status"] != "recovered":
            table.add_row(r["attack"], f"{r['status'].replace('_', ' ')}: {r['reason']}", "", "")
            continue
        m = r["metrics"]
        table.add_row(r["attack"], *(_ci(m[k]) for k in ("auc", "tpr@0.01", "tpr@0.001")))
    console.print(table)
    for row in result["canary_summary"]:
        beams = ", ".join(f"{k.removeprefix('extracted_')} {v:.0%}" for k, v in row.items() if k.startswith("extr"))
        console.print(
            f"canaries k={row['k']}: mean exposure {row['mean_exposure']:.1f} of "
            f"{row['max_exposure']:.1f} bits; extracted {beams}"
        )
    console.print(f"held-out perplexity {result['utility']['heldout_perplexity']:.2f}")


def _ci(m: dict) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def read_texts(path: Path, what: str) -> list[str]:
    """Texts of a .txt (one per line), .csv or .jsonl file ('text' column/field); an empty file is an error."""
    from leaklab.corpora import load_corpus

    if not path.is_file():
        raise LeaklabError(f"{what} file '{path}' does not exist")
    try:
        blank = not path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise LeaklabError(f"{what} file '{path}' is not UTF-8 text") from None
    if blank:
        raise LeaklabError(f"{what} file '{path}' holds no text")
    return list(load_corpus(str(path)).texts)


@app.command("membership")
def membership_cmd(
    model: Annotated[str, typer.Option(help="Your fine-tuned model (Hugging Face folder).")],
    candidates: Annotated[Path, typer.Option(help="Texts to test (.txt one per line, .csv or .jsonl 'text').")],
    base: BaseOpt = None,
    non_members: Annotated[
        Path | None, typer.Option(help="Texts known NOT to be in the fine-tune: calibrate the decision threshold.")
    ] = None,
    fpr: Annotated[float, typer.Option(help="False-positive rate of the decision on the non-members.")] = 0.01,
    attack: Annotated[str | None, typer.Option(help="Attack (default: reference with --base, else min-k++).")] = None,
    as_json: common.JsonOpt = False,
) -> None:
    """Was this text in our fine-tune? A membership score per candidate, and, with known non-members, a member /
    non-member decision whose false-positive rate on them is at most --fpr."""
    from leaklab.attacks.membership import score_texts
    from leaklab.metrics.membership import threshold_at_fpr

    if not 0 < fpr < 1:
        raise LeaklabError(f"--fpr must be in (0, 1), got {fpr}")
    texts = read_texts(candidates, "candidates")
    calib = read_texts(non_members, "non-members") if non_members else None
    access = _access(model, base, None, None)
    name = attack or ("reference" if base else "min-k++")
    scores = score_texts(access, name, texts)
    threshold = threshold_at_fpr(score_texts(access, name, calib), fpr) if calib else None
    rows = [
        {"text": t, "score": float(s), "member": (bool(s > threshold) if threshold is not None else None)}
        for t, s in zip(texts, scores, strict=True)
    ]
    if as_json:
        print(
            json.dumps(
                {
                    "attack": name,
                    "grants": access.grants.to_dict(),
                    "fpr": fpr,
                    "threshold": threshold,
                    "calibration_texts": len(calib or []),
                    "candidates": rows,
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{name} membership scores (higher = likelier member)")
    for col in ("score", "decision", "text"):
        table.add_column(col, overflow="fold")
    for r in rows:
        decision = "n/a" if r["member"] is None else ("MEMBER" if r["member"] else "non-member")
        table.add_row(f"{r['score']:.4f}", decision, r["text"][:100])
    console.print(table)
    if threshold is None:
        console.print("no decision: give --non-members (texts known not to be in the fine-tune) to calibrate one")
    else:
        console.print(
            f"threshold {threshold:.4f}: at most {fpr:.1%} of the {len(calib or [])} known non-members "
            f"score above it; {sum(r['member'] for r in rows)} of {len(rows)} candidates called members"
        )
