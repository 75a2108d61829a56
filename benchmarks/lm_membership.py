"""Membership inference and canary extraction on fine-tuned smollm2-135m (rotten-tomatoes, short texts).

Each cell fine-tunes smollm2-135m on ``--members`` member texts of the private split (plus canaries inserted
k ∈ {1, 4, 16} times), then runs every membership attack (LOSS, zlib, Min-K%, Min-K%++, reference = base model,
RMIA with shadow LoRA fine-tunes on public texts), canary exposure and prefix extraction, and held-out
perplexity. Fine-tunes, shadows and each cell's results are cached; a cell whose estimated time (from the
training speed measured so far) does not fit in ``--budget-min`` is reported as not run, with its estimate.

    python benchmarks/lm_membership.py                       # every cell, 500 members
    python benchmarks/lm_membership.py --cells full-e10,dp-eps8 --budget-min 40
    python benchmarks/lm_membership.py --report-only          # rewrite the Markdown from cached cells

Writes benchmarks/results/lm-membership/{results.md, cells/*.json, roc-*.png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "lm-membership"

#: cell name → fine-tuning options (all on smollm2-135m, rotten-tomatoes private split, 4..32 tokens)
CELLS: dict[str, dict[str, Any]] = {
    "full-e10": {"method": "full", "epochs": 10},
    "dp-eps8": {"method": "lora", "epochs": 3, "epsilon": 8.0},
    "full-e1": {"method": "full", "epochs": 1},
    "full-e3": {"method": "full", "epochs": 3},
    "lora-e10": {"method": "lora", "epochs": 10},
    "lora-e1": {"method": "lora", "epochs": 1},
    "lora-e3": {"method": "lora", "epochs": 3},
    "dp-eps1": {"method": "lora", "epochs": 3, "epsilon": 1.0},
}
ATTACKS = ("loss", "zlib", "min-k", "min-k++", "reference", "rmia")


def cell_tag(cell: str, args: argparse.Namespace) -> str:
    return f"{cell}-n{args.members}" + ("" if args.model == "smollm2-135m" else f"-{args.model}")


def finetune_config(cell: str, args: argparse.Namespace):
    from leaklab.threat.finetune import FinetuneConfig

    return FinetuneConfig(
        model=args.model,
        corpus="rotten-tomatoes",
        members=args.members,
        min_tokens=4,
        max_tokens=32,
        canary_repeats="1,4,16",
        canaries_per_repeat=args.canaries_per_k,
        seed=0,
        **CELLS[cell],
    )


def run_cell(cell: str, args: argparse.Namespace, cache: Path, score_by: float | None = None) -> dict[str, Any]:
    """Fine-tune (or reuse the cached fine-tune) and score the cell; ``score_by``: the perf-counter time by which
    scoring is expected to end, else the cell stops after fine-tuning (ChunkEnd) and a rerun scores it."""
    from leaklab.experiments.lm_membership import evaluate_membership
    from leaklab.threat.finetune import finetune, load_record, load_secret

    tag = cell_tag(cell, args)
    folder = cache / tag
    cfg = finetune_config(cell, args)
    if not is_cached(folder, cfg):
        snaps = {e: cache / cell_tag(c, args) for c, e in snapshot_cells(cell)}
        snaps = {e: f for e, f in snaps.items() if not is_cached(f, replace(cfg, epochs=e))}
        print(f"[{tag}] fine-tuning" + (f" (snapshots at epochs {sorted(snaps)})" if snaps else ""), flush=True)
        finetune(
            cfg,
            folder,
            progress=chunk_progress(tag, cfg.epochs, args.stop_after_min),
            snapshots=snaps,
        )
    if score_by is not None and time.perf_counter() > score_by:
        raise ChunkEnd(f"[{tag}] fine-tuned; no time left to score it in this run: rerun to score")
    record = load_record(folder)
    access = attacker_access(folder, args.model, cache)
    start = time.perf_counter()
    attacks = [a for a in ATTACKS if a != "rmia" or args.shadows > 0]
    result = evaluate_membership(
        access,
        load_secret(folder),
        attacks,
        attack_options(args),
        exposure_samples=args.exposure_samples,
        progress=lambda s: print(f"[{tag}] {s}", flush=True),
    )
    keep_base_stats(access, cache)
    result.update(
        control=base_control(access, load_secret(folder)),
        cell=cell,
        tag=tag,
        finetune=record,
        attack_seconds=time.perf_counter() - start,
        bench_args=common_args(args),
        canaries_per_k=args.canaries_per_k,
    )
    return result


class ChunkEnd(Exception):
    """A resumable fine-tune stopped at an epoch boundary because the chunk's time is up."""


def chunk_progress(tag: str, epochs: int, stop_after_min: float | None):
    """Prints each step; after ``stop_after_min`` minutes, stops at the first step of a new epoch (the state
    after the finished epochs is saved, so the next run resumes there, losing one step)."""
    start, first = time.perf_counter(), []

    def progress(what: str, done: int, total: int) -> None:
        print(f"[{tag}] {what} {done}/{total}", flush=True)
        if not first:
            first.append(done)
        per_epoch = total // epochs
        late = stop_after_min is not None and time.perf_counter() - start > stop_after_min * 60
        if late and done > first[0] and done % per_epoch == 1:
            raise ChunkEnd(f"[{tag}] stopped after {(done - 1) // per_epoch} epochs: rerun to resume")

    return progress


def base_control(access, secret) -> dict[str, Any]:
    """LOSS under the base model (never trained on either half): how far the split alone separates members from
    non-members, the floor any attack's AUC is read against (from statistics the reference attack computed)."""
    from leaklab.metrics.membership import bootstrap

    texts = list(secret.members) + list(secret.non_members)
    scores = [s.logp.mean() for s in access.stats(access.base, texts)]
    labels = [1] * len(secret.members) + [0] * len(secret.non_members)
    return {"base_loss_auc": bootstrap(scores, labels, None, 1000, 0).to_dict()}


def is_cached(folder: Path, cfg) -> bool:
    from leaklab.threat.finetune import load_record

    return (folder / "config.json").is_file() and load_record(folder).get("config") == cfg.to_dict()


def snapshot_cells(cell: str) -> list[tuple[str, int]]:
    """The cells that are earlier epochs of ``cell``'s non-DP run: saved from it on the way."""
    opts = CELLS[cell]
    if "epsilon" in opts:
        return []
    return [
        (c, CELLS[c]["epochs"])
        for c in CELLS
        if "epsilon" not in CELLS[c] and CELLS[c]["method"] == opts["method"] and CELLS[c]["epochs"] < opts["epochs"]
    ]


def add_attacks(cell: str, args: argparse.Namespace, cache: Path, result: dict[str, Any]) -> bool:
    """Run the attacks of ``--add-attacks`` that a cached cell lacks on its cached fine-tune; True if any ran."""
    from leaklab.attacks.membership.extraction import canary_exposure, extract_canaries
    from leaklab.experiments.lm_membership import attack_rows, summarise_canaries
    from leaklab.threat.finetune import load_secret

    have = {r["attack"] for r in result["attacks"] if r["status"] == "recovered"}
    todo = [a for a in args.add_attacks if a not in have and a != "canaries"]
    stale = "canaries" in args.add_attacks and any(
        r.get("exposure_fitted") is None for r in result["canaries"]["exposure"]
    )
    if not todo and not stale:
        return False
    tag = result["tag"]
    start = time.perf_counter()
    access, secret = attacker_access(cache / tag, args.model, cache), load_secret(cache / tag)

    def progress(step: str) -> None:
        print(f"[{tag}] {step}", flush=True)

    rows = attack_rows(access, secret, todo, attack_options(args), progress=progress)
    keep_base_stats(access, cache)
    result["attacks"] = [r for r in result["attacks"] if r["attack"] not in todo] + rows
    if stale:
        progress("canaries")
        result["canaries"] = {
            "exposure": canary_exposure(access.target, secret.canaries, secret.canary_digits, args.exposure_samples),
            "extraction": extract_canaries(access.target, secret.canaries),
        }
        result["canary_summary"] = summarise_canaries(result["canaries"], (1, 5))
        todo.append("canaries")
    result["attack_seconds"] += time.perf_counter() - start
    result.setdefault("added", []).append({"attacks": todo, "args": common_args(args)})
    return True


def attacker_access(folder: Path, model: str, cache: Path):
    """The fine-tune, the base model and the corpus's public split (each grant recorded by the access)."""
    from leaklab.attacks.membership import LMAccess
    from leaklab.corpora import load_corpus
    from leaklab.corpora.sampling import split_of
    from leaklab.models.causal import load_causal_lm

    public = tuple(t for t in load_corpus("rotten-tomatoes").texts if split_of(t) == "public")
    if model not in _BASE:  # one base model per process; its statistics are kept on disk for the next runs
        _BASE[model] = (load_causal_lm(model), load_base_stats(cache, model))
    base, seen = _BASE[model]
    access = LMAccess(load_causal_lm(str(folder)), base, public, cache / "shadows")
    access.learn(base, seen)
    return access


def base_stats_file(cache: Path, model: str) -> Path:
    return cache / f"base-stats-{hashlib.sha256(model.encode('utf-8')).hexdigest()[:12]}.pkl"


def load_base_stats(cache: Path, model: str) -> dict:
    """The base model's token statistics by text computed by earlier runs (the base model never changes)."""
    path = base_stats_file(cache, model)
    return pickle.loads(path.read_bytes()) if path.is_file() else {}


def keep_base_stats(access, cache: Path) -> None:
    """Remember what the cell computed under the shared base model, for the next cells and the next runs."""
    seen = _BASE[access.base.name][1]
    new = {t: s for t, s in access.known(access.base).items() if t not in seen}
    if new:
        seen.update(new)
        path = base_stats_file(cache, access.base.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(seen))
        tmp.replace(path)


#: model name → (the base model, its token statistics by text), shared by the cells one process scores
_BASE: dict[str, tuple[Any, dict]] = {}


def attack_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {"rmia": {"shadows": args.shadows, "shadow_texts": args.shadow_texts, "population": args.population}}


def estimate_seconds(cell: str, args: argparse.Namespace, pace: dict[str, float]) -> float | None:
    """Training texts × epochs × measured seconds per text-pass (full or LoRA/DP), plus a scoring allowance."""
    opts = CELLS[cell]
    kind = "dp" if "epsilon" in opts else opts["method"]
    per_text = pace.get(kind) or pace.get("full")
    if per_text is None:
        return None
    texts = args.members + args.canaries_per_k * 21
    return texts * opts["epochs"] * per_text + (score_estimate(args, pace) or 0.0)


def update_pace(pace: dict[str, float], result: dict[str, Any]) -> None:
    ft = result["finetune"]
    kind = "dp" if ft["config"].get("epsilon") else ft["config"]["method"]
    passes = ft["texts"] * ft["config"]["epochs"]
    pace[kind] = sum(ft["epoch_seconds"]) / passes
    pace["score"] = result["attack_seconds"]
    pace["score_per_candidate"] = result["attack_seconds"] / (result["members"] + result["non_members"])


def score_estimate(args: argparse.Namespace, pace: dict[str, float]) -> float | None:
    """Seconds to score one cell of ``args.members`` members (as many non-members) at the last measured pace."""
    if "score_per_candidate" in pace:
        return pace["score_per_candidate"] * 2 * args.members
    return pace.get("score")


def plot_roc(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for r in result["attacks"]:
        if r["status"] == "recovered":
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{r['attack']} ({r['metrics']['auc']['value']:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(result["tag"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ci(m: dict[str, float]) -> str:
    return f"{m['value']:.3f} [{m['low']:.2f}, {m['high']:.2f}]"


def best(result: dict[str, Any], key: str = "auc") -> tuple[str, float]:
    ok = [r for r in result["attacks"] if r["status"] == "recovered"]
    top = max(ok, key=lambda r: r["metrics"][key]["value"])
    return top["attack"], top["metrics"][key]["value"]


def _metric(res: dict[str, Any], attack: str, key: str) -> float | None:
    for r in res["attacks"]:
        if r["attack"] == attack and r["status"] == "recovered":
            return r["metrics"][key]["value"]
    return None


def own_training(result: dict[str, Any]) -> float:
    """Training seconds of a cell; 0 for a snapshot saved during a longer run (its time is that run's)."""
    ft = result["finetune"]
    return 0.0 if "snapshot_of_epochs" in ft else ft["seconds"]


def _verdict(ok: bool) -> str:
    return "reached" if ok else "missed"


def targets(results: dict[str, dict], members: int) -> list[str]:
    """Each target of the issue as reached / missed / not measured at ``members`` members, with the value."""
    out = []
    full = results.get(f"full-e10-n{members}")
    if full:
        name, auc = best(full)
        tpr_name, tpr = best(full, "tpr@0.01")
        out.append(
            f"- 10-epoch full fine-tune, best AUC ≥ 0.9: {_verdict(auc >= 0.9)} ({name} {auc:.3f}); "
            f"TPR@1 %FPR ≥ 0.3: {_verdict(tpr >= 0.3)} ({tpr_name} {tpr:.3f})."
        )
        pairs = []
        for c in CELLS:
            res = results.get(f"{c}-n{members}")
            ref, loss = (_metric(res, "reference", "auc"), _metric(res, "loss", "auc")) if res else (None, None)
            if ref is not None and loss is not None:
                verdict = "tie" if f"{ref:.3f}" == f"{loss:.3f}" else "yes" if ref > loss else "no"
                pairs.append(f"{c} {verdict}, {ref:.3f} vs {loss:.3f}")
        if pairs:
            out.append(f"- reference above LOSS (AUC): {'; '.join(pairs)}.")
        k16 = [r for r in full["canary_summary"] if r["k"] == 16]
        if k16:
            share = max(k16[0]["extracted_beam1"], k16[0]["extracted_beam5"])
            out.append(
                f"- canaries k=16 extracted by prefix prompting ≥ 50 %: {_verdict(share >= 0.5)} "
                f"({share:.0%} of {k16[0]['canaries']})."
            )
    else:
        out.append("- 10-epoch full fine-tune targets (AUC, TPR@1 %, reference vs LOSS, k=16 extraction): not run.")
    dp = results.get(f"dp-eps8-n{members}")
    if dp:
        name, auc = best(dp)
        u = dp["utility"]
        cost = f"held-out perplexity {u['heldout_perplexity']:.2f} vs base {u['base_heldout_perplexity']:.2f}"
        for other in ("lora-e3", "full-e3", "full-e10"):
            if f"{other}-n{members}" in results:
                cost += (
                    f" and non-private {other} {results[f'{other}-n{members}']['utility']['heldout_perplexity']:.2f}"
                )
        out.append(f"- DP ε=8, best AUC ≤ 0.6: {_verdict(auc <= 0.6)} ({name} {auc:.3f}); {cost}.")
    else:
        out.append("- DP ε=8 target: not run.")
    return out


def timing(results: dict[str, dict], members: int) -> list[str]:
    """What the cells run at ``members`` members took: training (own runs only) and scoring."""
    cells = [r for r in results.values() if r["members"] == members]
    train = sum(own_training(r) for r in cells)
    score = sum(r["attack_seconds"] for r in cells)
    missing = [c for c in CELLS if f"{c}-n{members}" not in results]
    return [
        f"- {len(cells)} of {len(CELLS)} cells run: training {train / 60:.0f} min, scoring {score / 60:.0f} min; "
        f"a rerun with the fine-tunes cached takes the scoring time: {score / 60:.0f} min"
        + (f" (cells not run: {', '.join(missing)})." if missing else ".")
    ]


def common_args(args: argparse.Namespace) -> str:
    model = "" if args.model == "smollm2-135m" else f"--model {args.model} "
    return (
        f"{model}--members {args.members} --canaries-per-k {args.canaries_per_k} --shadows {args.shadows} "
        f"--shadow-texts {args.shadow_texts} --population {args.population} --exposure-samples {args.exposure_samples}"
    )


def report(results: dict[str, dict], pace: dict[str, float]) -> str:
    """The Markdown of every cached cell (every member count), largest member count first."""
    counts = sorted({r["members"] for r in results.values()}, reverse=True)
    lines = [
        "# LM membership inference and canary extraction (smollm2-135m, rotten-tomatoes short)",
        "",
        "Commands (one per member count; fine-tunes cached under $LEAKLAB_CACHE/lm-membership, cells cached in "
        "`cells/`, so chunked runs accumulate here):",
        "",
    ]
    for n in counts:
        cells = [r for r in results.values() if r["members"] == n]
        runs: dict[str, list[str]] = {}
        default = next((r["bench_args"] for r in cells if r.get("bench_args")), "")  # cells cached before it was kept
        for r in cells:
            runs.setdefault(r.get("bench_args") or default, []).append(r["cell"])
        for bench_args, names in runs.items():
            lines.append(f"- {n} members: `python benchmarks/lm_membership.py {bench_args} --cells {','.join(names)}`")
        added: dict[tuple[str, str], list[str]] = {}
        for r in cells:
            for a in r.get("added", []):
                added.setdefault((a["args"], ",".join(a["attacks"])), []).append(r["cell"])
        for (extra, attacks), names in added.items():
            lines.append(
                f"  - then `python benchmarks/lm_membership.py {extra} --add-attacks {attacks} "
                f"--cells {','.join(names)}`"
            )
    lines += [
        "",
        "Members: texts of the rotten-tomatoes private split with 4..32 tokens; non-members: as many held-out "
        "texts of the same split and length range (one random halving; KS tests recorded). Canaries "
        "`<prefix> dddd-dddd` (10^8 space) inserted k ∈ {1, 4, 16} times; the 24-member cells used one prefix "
        "(`my account number is`) and one canary per k, later cells one prefix per canary (`alice's account number "
        "is`, ...). Attacks see the fine-tune; `reference` and `rmia` are also granted the base model, `rmia` "
        "public texts (shadow LoRA fine-tunes). Intervals: 95 % bootstrap (1000 resamples). Held-out perplexity: "
        "on the non-members. `score s`: the cell's scoring time (every attack, canaries, perplexity; it includes the "
        "base model's pass over the candidates only when no earlier run had cached it). `base-model LOSS AUC`: LOSS "
        "under the base model, trained on neither half: what the split alone gives an attack (a control). Timings "
        "were taken on a shared 2-core machine (other helpers' jobs running; the 500-member runs with one torch "
        "thread, `OMP_NUM_THREADS=1`).",
        "",
    ]
    if results:
        lines += _membership_table(results) + _victim_table(results) + _canary_table(results)
    for n in counts:
        lines += ["", f"## Targets (issue 22) at {n} members", "", *targets(results, n), *timing(results, n)]
    if not any(r["attack"] == "rmia" for res in results.values() for r in res["attacks"]):
        lines += ["", "rmia: not run in any cell (`--shadows 0`)."]
    if pace:
        lines += [
            "",
            "Last measured pace (seconds per training text-pass, shared machine): "
            + ", ".join(f"{k} {v:.2f}" for k, v in pace.items() if k != "score")
            + (f"; scoring the last cell {pace['score']:.0f} s" if "score" in pace else ""),
        ]
    return "\n".join(lines) + "\n"


def _membership_table(results: dict[str, dict]) -> list[str]:
    lines = ["## Membership (AUC, TPR@1 %FPR, TPR@0.1 %FPR with 95 % CI)", ""]
    lines += ["| cell | attack | AUC | TPR@1% | TPR@0.1% |", "|---|---|---|---|---|"]
    for tag, res in results.items():
        for r in res["attacks"]:
            if r["status"] != "recovered":
                lines.append(f"| {tag} | {r['attack']} | {r['status'].replace('_', ' ')}: {r['reason']} | | |")
                continue
            m = r["metrics"]
            lines.append(f"| {tag} | {r['attack']} | {_ci(m['auc'])} | {_ci(m['tpr@0.01'])} | {_ci(m['tpr@0.001'])} |")
    return [*lines, "", "ROC curves: `roc-<cell>.png`.", ""]


def _victim_table(results: dict[str, dict]) -> list[str]:
    lines = ["## Victims: training, privacy, utility", ""]
    lines += [
        "| cell | method | epochs | DP ε (δ) | σ | steps | train s | s/epoch | score s | held-out ppl | base ppl "
        "| length KS p | base-model LOSS AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, res in results.items():
        ft = res["finetune"]
        c, dp = ft["config"], ft.get("dp")
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:g})" if dp else "-"
        sigma = f"{dp['noise_multiplier']:.3f}" if dp else "-"
        per_epoch = sum(ft["epoch_seconds"]) / len(ft["epoch_seconds"])
        own = f"{ft['seconds']:.0f}" + (
            f" (in the {ft['snapshot_of_epochs']}-epoch run)" if "snapshot_of_epochs" in ft else ""
        )
        u = res["utility"]
        control = res.get("control", {}).get("base_loss_auc")
        lines.append(
            f"| {tag} | {c['method']} | {c['epochs']} | {eps} | {sigma} | {ft['steps']} | {own} | {per_epoch:.0f} | "
            f"{res['attack_seconds']:.0f} | {u['heldout_perplexity']:.2f} | {u['base_heldout_perplexity']:.2f} | "
            f"{res['shift']['length']['p']:.2f} | {'-' if control is None else _ci(control)} |"
        )
    return [*lines, ""]


def _canary_table(results: dict[str, dict]) -> list[str]:
    lines = ["## Canaries: exposure and extraction by k", ""]
    lines += [
        "| cell | k | canaries | mean exposure (bits, of 26.6) | at sampling bound | fitted exposure (normal tail) "
        "| greedy extracted | beam-5 extracted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag, res in results.items():
        for row in res["canary_summary"]:
            fitted = row.get("mean_exposure_fitted")
            lines.append(
                f"| {tag} | {row['k']} | {row['canaries']} | {row['mean_exposure']:.1f} | {row['at_bound']} | "
                f"{'-' if fitted is None else f'{fitted:.1f}'} | {row['extracted_beam1']:.0%} | "
                f"{row['extracted_beam5']:.0%} |"
            )
    return [
        *lines,
        "",
        "Exposure is estimated from sampled secrets of the format; with s samples it is resolved only up to "
        "log2(s) bits below the ceiling, so a canary that no sample beats sits at the bound (26.6). The fitted "
        "column extrapolates past it with a normal fit to the sampled losses (the Secret Sharer's estimate; "
        "'-': cell scored before it existed).",
    ]


def cached_cells(out: Path, model: str) -> dict[str, dict]:
    """Every cell result in ``out/cells`` for ``model``, largest member count first, then in CELLS order."""
    found = []
    for path in out.glob("cells/*.json"):
        res = json.loads(path.read_text())
        if res["finetune"]["config"]["model"] == model:
            found.append(res)
    found.sort(key=lambda r: (-r["members"], list(CELLS).index(r["cell"])))
    return {r["tag"]: r for r in found}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", default=",".join(CELLS), help="comma list, in priority order")
    p.add_argument("--members", type=int, default=500)
    p.add_argument("--model", default="smollm2-135m", help="victim and base model (tiny-llama: a smoke run)")
    p.add_argument("--canaries-per-k", type=int, default=4)
    p.add_argument("--shadows", type=int, default=2, help="RMIA shadow models (0: skip RMIA)")
    p.add_argument("--shadow-texts", type=int, default=250)
    p.add_argument("--population", type=int, default=200)
    p.add_argument("--exposure-samples", type=int, default=1000)
    p.add_argument("--budget-min", type=float, default=120.0, help="skip cells whose estimate would exceed it")
    p.add_argument(
        "--stop-after-min",
        type=float,
        default=None,
        help="stop a resumable (non-DP) fine-tune at the first epoch boundary after this many minutes",
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--add-attacks",
        default="",
        help="comma list of attacks to add to cells already cached ('canaries': redo exposure and extraction "
        "where the fitted exposure is missing)",
    )
    p.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = p.parse_args(argv)
    args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    args.add_attacks = [a.strip() for a in args.add_attacks.split(",") if a.strip()]
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        print(f"unknown cell(s) {unknown}; valid: {', '.join(CELLS)}", file=sys.stderr)
        return 2
    from leaklab.io import atomic_write_json, atomic_write_text, cache_dir

    cache = cache_dir() / "lm-membership"
    out = args.out
    (out / "cells").mkdir(parents=True, exist_ok=True)
    pace_file = out / "pace.json"
    pace: dict[str, float] = json.loads(pace_file.read_text()) if pace_file.is_file() else {}
    start, ran = time.perf_counter(), False
    for cell in [] if args.report_only else args.cells:
        tag = cell_tag(cell, args)
        path = out / "cells" / f"{tag}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if args.add_attacks and add_attacks(cell, args, cache, cached):
                atomic_write_json(path, cached)
                plot_roc(cached, out / f"roc-{tag}.png")
                atomic_write_text(out / "results.md", report(cached_cells(out, args.model), pace))
            continue
        trained = is_cached(cache / tag, finetune_config(cell, args))
        est = score_estimate(args, pace) if trained else estimate_seconds(cell, args, pace)
        left = args.budget_min * 60 - (time.perf_counter() - start)
        if ran and est is not None and est > left:
            print(f"[{tag}] not run: estimated {est / 60:.0f} min, {max(left, 0) / 60:.0f} min of the budget left")
            continue
        try:
            scoring = score_estimate(args, pace)
            score_by = None if scoring is None else start + args.budget_min * 60 - scoring
            res = run_cell(cell, args, cache, score_by)
        except ChunkEnd as end:
            print(end, flush=True)
            break
        atomic_write_json(path, res)
        update_pace(pace, res)
        atomic_write_json(pace_file, pace)
        ran = True
        plot_roc(res, out / f"roc-{tag}.png")
        print(f"[{tag}] done: best AUC {best(res)}", flush=True)
        atomic_write_text(out / "results.md", report(cached_cells(out, args.model), pace))
    atomic_write_text(out / "results.md", report(cached_cells(out, args.model), pace))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
