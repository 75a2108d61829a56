"""Embedding-attack benchmark: every attack on minilm-l6 with rotten-tomatoes texts (≤ 32 tokens), inverters
trained on the public split only; writes embedding.md, embedding.json (one run record per entry) and PNG plots.
An entry that could not run, or found no signal, is shown as n/a with its reason, never as 0, and the other
entries go on. ``quick`` runs a tiny random encoder with few targets (a smoke test, not a measurement)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from leaklab.attacks.embedding.registry import EMBED_ATTACKS, AttackReport, Scenario
from leaklab.experiments.runner import embedding_record, record_outcome, run_embedding
from leaklab.io import atomic_write, atomic_write_json, atomic_write_text

FULL: dict[str, dict[str, Any]] = {
    "nearest": {"n": 100, "options": {"candidates": 2000}},
    "bow": {"n": 200, "options": {"train_seconds": 240, "epochs": 60, "augment": 8}},
    "whitebox": {
        "n": 30,
        "options": {
            "max_tokens": 16,
            "pool": 20,
            "full": True,
            "pieces": True,
            "prior": 40,
            "budget": 36000,
            "hops": 18,
            "words": 20,
            "nonword": 0.01,
            "spans": 2,
            "common": 4,
        },
    },
    "whitebox-lm": {
        "attack": "whitebox",
        "n": 30,
        "options": {
            "max_tokens": 16,
            "pool": 20,
            "full": True,
            "prior": 40,
            "budget": 6000,
            "lm": "smollm2-135m",
            "lm_budget": 3000,
        },
    },
    "decoder": {
        "n": 30,
        "options": {
            "arch": "gru",
            "train_seconds": 300,
            "steps": 5,
            "edits": 200,
            "search": 20000,
            "length_penalty": 0.003,
        },
    },
    "decoder-lm": {
        "attack": "decoder",
        "n": 30,
        "options": {"arch": "lm", "train_seconds": 900, "layers": 2, "lr": 1e-4, "steps": 2},
    },
    "alignment": {
        "n": 100,
        "options": {"k": "8,32,128,384,1024", "inner": "nearest,bow", "train_seconds": 90},
    },
    "kb-extract": {
        "n": 200,
        "options": {
            "encoder_known": True,
            "vocab": 3000,
            "wb_vocab": 3000,
            "pool": 12,
            "passes": 1,
            "wb_candidates": 4,
            "length": 32,
            "full": True,
            "prior": 12,
        },
    },
    "kb-extract-blackbox": {"attack": "kb-extract", "n": 200, "options": {"vocab": 3000, "candidates": 60}},
    "clustering": {"n": 200, "options": {"probes": 400}},
    "membership": {"n": 200, "options": {"target": "kb"}},
    "membership-encoder": {"n": 100, "options": {"target": "encoder", "epochs": 3}},
}
QUICK: dict[str, dict[str, Any]] = {
    "nearest": {"n": 6, "options": {"candidates": 50}},
    "bow": {"n": 6, "options": {"train_seconds": 5, "epochs": 2}, "public_limit": 300},
    "whitebox": {"n": 2, "options": {"max_tokens": 8, "length": 6, "passes": 1, "vocab": 500}},
    "whitebox-lm": {
        "attack": "whitebox",
        "n": 2,
        "options": {"max_tokens": 8, "length": 6, "passes": 1, "vocab": 500, "lm": "tiny-llama", "lm_budget": 50},
    },
    "decoder": {"n": 3, "options": {"arch": "gru", "train_seconds": 5, "steps": 1}, "public_limit": 200},
    "decoder-lm": {
        "attack": "decoder",
        "n": 3,
        "options": {"arch": "lm", "base": "tiny-llama", "layers": 1, "train_seconds": 5, "steps": 1},
        "public_limit": 200,
    },
    "alignment": {"n": 4, "options": {"k": "4,16", "inner": "nearest"}, "public_limit": 100},
    "kb-extract": {
        "n": 3,
        "options": {
            "encoder_known": True,
            "vocab": 150,
            "wb_vocab": 150,
            "probes": 200,
            "passes": 1,
            "wb_candidates": 4,
        },
        "public_limit": 200,
    },
    "kb-extract-blackbox": {
        "attack": "kb-extract",
        "n": 3,
        "options": {"vocab": 150, "candidates": 10},
        "public_limit": 200,
    },
    "clustering": {"n": 12, "options": {"probes": 40, "clusters": 3}},
    "membership": {"n": 8, "options": {"target": "kb"}},
    "membership-encoder": {"n": 8, "options": {"target": "encoder", "epochs": 1}},
}
TARGETS = {
    "bow": ("token F1 ≥ 0.6", lambda m: m["token_f1"], 0.6),
    "decoder": ("ROUGE-L ≥ 0.5 after ≤ 15 min CPU training", lambda m: m["rougeL"], 0.5),
    "decoder-lm": ("ROUGE-L ≥ 0.5 after ≤ 15 min CPU training", lambda m: m["rougeL"], 0.5),
    "whitebox": ("token F1 ≥ 0.7 on ≤ 16-token texts", lambda m: m["token_f1"], 0.7),
    "whitebox-lm": ("token F1 ≥ 0.7 on ≤ 16-token texts", lambda m: m["token_f1"], 0.7),
    "kb-extract": ("≥ 95% of 200 docs recovered to token F1 ≥ 0.8", lambda m: m["recovered_share"], 0.95),
    "kb-extract-blackbox": ("≥ 95% of 200 docs recovered to token F1 ≥ 0.8", lambda m: m["recovered_share"], 0.95),
}


def rerender(out: Path, quick: bool = False) -> list[Path]:
    """Rewrite the table and plots from an existing results JSON (no attack is run)."""
    from leaklab.errors import LeaklabError

    stem = "embedding-quick" if quick else "embedding"
    path = out / f"{stem}.json"
    if not path.exists():
        raise LeaklabError(f"no benchmark results at {path}: run `leaklab embed bench` first")
    data = json.loads(path.read_text(encoding="utf-8"))
    results = {k: as_record(v) for k, v in data["results"].items()}
    return _write(results, out, stem, data["encoder"], data["quick"], data["seed"])


def run_bench(
    out: Path,
    quick: bool = False,
    only: list[str] | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> list[Path]:
    console = console or Console()
    plan = QUICK if quick else FULL
    names = only or list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        from leaklab.errors import UnknownNameError

        raise UnknownNameError("benchmark entry", unknown[0], list(plan))
    encoder = "tiny-bert" if quick else "minilm-l6"
    for name in names:  # every entry's options are checked before the first attack runs
        EMBED_ATTACKS.get(_attack_of(name, plan[name])).options(plan[name]["options"])
    stem = "embedding-quick" if quick else "embedding"
    results: dict[str, Any] = _previous(out / f"{stem}.json", encoder) if only else {}
    paths: list[Path] = []
    for name in names:
        cfg = plan[name]
        attack = _attack_of(name, cfg)
        scn = Scenario(encoder, "rotten-tomatoes", cfg["n"], seed, 1, 32, cfg.get("public_limit"))
        console.print(f"[bold]{name}[/] on {encoder} (n={cfg['n']}) …")
        start = time.perf_counter()
        results[name] = run_embedding(attack, scn, cfg["options"]).to_dict()
        outcome = record_outcome(results[name])
        console.print(f"  {outcome} in {time.perf_counter() - start:.0f} s", highlight=False, markup=False)
        paths = _write(results, out, stem, encoder, quick, seed)  # after each attack: partial runs survive
    return paths


def _attack_of(name: str, entry: dict[str, Any]) -> str:
    """The attack a bench entry runs: its ``attack`` key, else its name (``membership-encoder``: membership)."""
    return entry.get("attack", name.split("-encoder")[0])


def _previous(path: Path, encoder: str) -> dict[str, Any]:
    """Results of an earlier run (same encoder) that ``--only`` updates in place."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: as_record(v) for k, v in data.get("results", {}).items()} if data.get("encoder") == encoder else {}


def as_record(entry: dict[str, Any]) -> dict[str, Any]:
    """A results entry as a run record (:meth:`RunRecord.to_dict`); entries written before the runner held the
    attack report (metrics, usage, flags, examples, seconds) of a run that recovered."""
    if "status" in entry:
        return entry
    scenario = {k: v for k, v in entry["scenario"].items() if k != "options"}
    pairs = [{"true_text": e["true"], "pred_text": e["recovered"]} for e in entry.get("examples", [])]
    report = AttackReport(
        entry["attack"], scenario, entry["metrics"], entry["usage"], entry["flags"], pairs, entry["info"]
    )
    options = entry["scenario"].get("options", {})
    return embedding_record(entry["attack"], options, scenario, entry["seconds"], "recovered", None, report).to_dict()


def scored(results: dict[str, Any]) -> dict[str, Any]:
    """The entries that recovered something (their metrics are in ``aggregate``)."""
    return {k: r for k, r in results.items() if r["status"] == "recovered"}


def _write(results: dict[str, Any], out: Path, stem: str, encoder: str, quick: bool, seed: int) -> list[Path]:
    ordered = {k: results[k] for k in FULL if k in results}
    payload = {
        "encoder": encoder,
        "corpus": "rotten-tomatoes",
        "quick": quick,
        "seed": seed,
        "machine": f"{platform.machine()}, {_cpus()} CPU cores (shared), no GPU",
        "results": ordered,
        "targets": _targets(ordered),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write_json(out / f"{stem}.json", payload),
        atomic_write_text(out / f"{stem}.md", render_markdown(payload)),
    ]
    return paths + _plots(ordered, out, stem)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target's measured value; an entry that did not recover has none (n/a, its outcome as the note)."""
    rows = []
    for name, (label, get, goal) in TARGETS.items():
        if name not in results:
            continue
        r = results[name]
        row: dict[str, Any] = {"attack": name, "target": label, "measured": None, "reached": None}
        if r["status"] == "recovered":
            value = float(get(r["aggregate"]))
            row |= {"measured": round(value, 4), "reached": value >= goal, "note": _note(name, r)}
        else:
            row["note"] = record_outcome(r)
        rows.append(row)
    return rows


def _note(name: str, r: dict[str, Any]) -> str:
    """Context a reader needs beside a target's measured value."""
    m, info = r["aggregate"], r["info"]
    if name.startswith("decoder"):
        search = info.get("search_budget", 0)
        return (
            f"{info.get('arch', 'gru')} decoder; {info.get('train_seconds', '?')} s of training (wall, shared CPU), "
            f"{info.get('steps', '?')} optimiser steps"
            + (f"; black-box search ≤ {search} queries per vector" if search else "")
            + f"; n={m['n']}"
        )
    if name == "bow" and "augmented_pairs" in info:
        return (
            f"{info.get('model')} probe + whitened NNLS over a forward word dictionary; {info['public_pairs']} public "
            f"+ {info['augmented_pairs']} span pairs, {info.get('seconds', '?')} s training; n={m['n']}"
        )
    if name.startswith("kb-extract"):
        known = "encoder known" if r["observation"]["flags"].get("encoder_known") else "search endpoint only"
        return f"{known}; {m['queries_per_doc']:.0f} queries per document; mean token F1 {m['token_f1']:.3f}"
    return f"n={m['n']}"


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def render_markdown(payload: dict[str, Any]) -> str:
    res = payload["results"]
    lines = [
        f"# Embedding attacks — {payload['encoder']}, {payload['corpus']} (≤ 32 tokens)",
        "",
        (
            f"Machine: {payload['machine']}. Inverters train on the public split only; targets are private "
            "texts. Regenerate with `leaklab embed bench" + (" --quick" if payload["quick"] else "") + "`."
        ),
        "",
        "## Targets",
        "",
        "| attack | target | measured | reached | note |",
        "|---|---|---|---|---|",
    ]
    for t in payload["targets"]:
        measured = "n/a" if t["measured"] is None else f"{t['measured']:.3f}"
        reached = {True: "yes", False: "no", None: "–"}[t["reached"]]
        lines.append(f"| {t['attack']} | {t['target']} | {measured} | {reached} | {t.get('note', '')} |")
    lines += _inversion(res)
    for section in (_nearest, _alignment, _kb, _clustering, _membership):
        lines += section(scored(res))
    lines += _not_scored(res) + _examples(scored(res))
    return "\n".join(lines) + "\n"


def _not_scored(res: dict[str, Any]) -> list[str]:
    """Entries that could not run or found no signal: n/a with the reason (never a score of 0)."""
    rows = [
        f"| {name} | {record_outcome(r)} | {r['attack_seconds']:.0f} |"
        for name, r in res.items()
        if r["status"] != "recovered"
    ]
    return ["", "## Not scored", "", "| entry | outcome | seconds |", "|---|---|---|", *rows] if rows else []


def _inversion(res: dict[str, Any]) -> list[str]:
    names = [n for n in ("bow", "whitebox", "whitebox-lm", "decoder", "decoder-lm") if n in res]
    if not names:
        return []
    lines = [
        "",
        "## Inversion",
        "",
        "| attack | n | token P | token R | token F1 | ROUGE-L | BLEU | exact | cosine | queries | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = res[name]
        if r["status"] != "recovered":
            lines.append(f"| {name} | {record_outcome(r)} |" + " |" * 9)
            continue
        m = r["aggregate"]
        lines.append(
            f"| {name} | {m['n']} | {m['token_precision']:.3f} | {m['token_recall']:.3f} | "
            f"{m['token_f1']:.3f} | {m['rougeL']:.3f} | {m['bleu']:.2f} | {m['exact']:.3f} | "
            f"{_fmt(m.get('cosine', '–'))} | {r['info']['usage'].get('queries', 0)} | {r['attack_seconds']:.0f} |"
        )
    for name in ("decoder", "decoder-lm"):
        if name not in res or res[name]["status"] != "recovered":
            continue
        m, info = res[name]["aggregate"], res[name]["info"]
        b = m["base"]
        usage_keys = ("training_usage", "search_bow_training_usage", "usage")
        training = json.dumps({k: v for k, v in info.items() if k not in usage_keys})
        stages = f"{name} before correction: token F1 {b['token_f1']:.3f}, ROUGE-L {b['rougeL']:.3f}, "
        stages += f"cosine {b.get('cosine', 0):.3f}."
        if "corrected" in m:
            c = m["corrected"]
            stages += (
                f" After correction, before the search: token F1 {c['token_f1']:.3f}, ROUGE-L {c['rougeL']:.3f}, "
                f"cosine {c.get('cosine', 0):.3f}."
            )
        bow_q = info.get("search_bow_training_usage", {}).get("queries", 0)
        lines += [
            "",
            (
                f"{stages} Training: {training}; correction (and search) queries per target: "
                f"{m['correction_queries_per_target']:.0f}"
                + (f"; the search's bag-of-words inverter embedded {bow_q} public texts" if bow_q else "")
                + "."
            ),
        ]
    return lines


def _nearest(res: dict[str, Any]) -> list[str]:
    if "nearest" not in res:
        return []
    m = res["nearest"]["aggregate"]
    return [
        "",
        "## Nearest neighbour / fingerprint",
        "",
        (
            f"{m['present']} of {m['present'] + m['absent']} leaked documents are in a {m['candidates']}-text "
            f"candidate list. Detection at cos ≥ 0.999: precision {m['detect_precision']:.3f}, recall "
            f"{m['detect_recall']:.3f}; presence AUC {m.get('presence_auc', float('nan')):.3f}; exact recovery "
            f"of present documents {m['exact_recovered_of_present']:.3f}; absent documents' nearest text token "
            f"F1 {m['absent_nearest_token_f1']:.3f}."
        ),
    ]


def _alignment(res: dict[str, Any]) -> list[str]:
    if "alignment" not in res:
        return []
    m, inner = res["alignment"]["aggregate"], res["alignment"]["observation"]["flags"]["inner_attacks"]
    lines = [
        "",
        f"## Alignment ({m['method']}; victim {m['victim']}, local {m['local']})",
        "",
        "| k pairs | mapped cosine | " + " | ".join(f"{a} token F1" for a in inner) + " |",
        "|---|---|" + "---|" * len(inner),
    ]
    for row in m["sweep"]:
        cells = " | ".join(f"{row[a]['token_f1']:.3f}" for a in inner)
        lines.append(f"| {row['k']} | {row['mapped_cosine']:.3f} | {cells} |")
    return lines


def _kb(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name in ("kb-extract", "kb-extract-blackbox"):
        if name in res:
            lines += _kb_one(name, res[name])
    return lines


def _kb_one(name: str, r: dict[str, Any]) -> list[str]:
    m, flags = r["aggregate"], r["observation"]["flags"]
    known = bool(flags.get("encoder_known"))
    head = (
        f"{m['docs']} hidden documents, top-{flags['top_k']} (id, score) answers. "
        f"Discovered {m['discovered']}; recovered to token F1 ≥ {m['recovered_f1_threshold']}: "
        f"{m['recovered_share']:.3f}; mean token F1 {m['token_f1']:.3f} (P {m['token_precision']:.3f}, "
        f"R {m['token_recall']:.3f}), ROUGE-L {m['rougeL']:.3f}. Queries: {m['queries_total']} in all = "
        f"{m['queries_per_doc']:.0f} per document"
    )
    if known:
        tail = (
            f" ({m['discovery_queries']} public probe texts + {m['adaptive_queries']} adaptive perturbations); "
            f"{m['observations_per_doc']:.0f} returned scores per document on average. Least-squares document "
            f"vectors: mean cosine to the true vector {m['vector_cosine']:.4f} (min {m['vector_cosine_min']:.4f}); "
            f"offline white-box inversion {m['inversion_seconds']:.0f} s, no further query. "
            f"{r['attack_seconds']:.0f} s."
        )
        title = "encoder known (flag `encoder_known`)"
    else:
        tail = (
            f" ({m['discovery_queries']} shared discovery probes + {m['growth_queries_per_doc']:.0f} growth "
            f"queries per document). {r['attack_seconds']:.0f} s."
        )
        title = "search endpoint only"
    return ["", f"## Knowledge-base extraction — {title}", "", head + tail]


def _clustering(res: dict[str, Any]) -> list[str]:
    if "clustering" not in res:
        return []
    r = res["clustering"]
    m = r["aggregate"]
    lines = [
        "",
        "## Clustering from probes",
        "",
        (
            f"{m['docs']} hidden {r['observation']['kb_corpus']} documents, "
            f"{r['info']['usage'].get('search_queries', 0)} "
            f"probe queries; {m['docs_retrieved']} documents retrieved. NMI with the true topics {m['nmi']:.3f} "
            f"(ARI {m['ari']:.3f}); k-means on the true vectors reaches NMI {m['oracle_nmi']:.3f}. Cosine of the "
            f"probe-built representation to the true vector {m['representation_cosine']:.3f}."
        ),
        "",
        "| cluster | majority true topic | keywords |",
        "|---|---|---|",
    ]
    for c, kw in m["keywords"].items():
        lines.append(f"| {c} | {m['true_topics'].get(c, '–')} | {', '.join(kw)} |")
    return lines


def _membership(res: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("membership", "membership-encoder"):
        for score, v in res.get(name, {}).get("aggregate", {}).items():
            if isinstance(v, dict) and "auc" in v:
                rows.append(
                    f"| {res[name]['observation']['flags']['target']} | {score} | {v['members']}/{v['non_members']} | "
                    f"{v['auc']:.3f} | {v['tpr_at_1pct_fpr']:.3f} | {v['tpr_at_0.1pct_fpr']:.3f} |"
                )
    if not rows:
        return []
    return [
        "",
        "## Membership",
        "",
        "| target | score | members/non-members | AUC | TPR@1%FPR | TPR@0.1%FPR |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _examples(res: dict[str, Any]) -> list[str]:
    lines = ["", "## Examples", ""]
    for name, r in res.items():
        for ex in r["pairs"][:2]:
            lines.append(f"- **{name}** — true: “{ex['true_text']}” → recovered: “{ex['pred_text']}”")
    return lines


def _plots(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Inversion bars (an entry that did not recover: a black ✕ marked n/a, no bar), the alignment sweep and the
    knowledge-base F1 histogram (those two only when their entry recovered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    inv = [n for n in ("bow", "whitebox", "whitebox-lm", "decoder", "decoder-lm", "kb-extract") if n in results]
    if inv:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        keys = ("token_f1", "rougeL", "cosine")
        failed = [x for x, n in enumerate(inv) if results[n]["status"] != "recovered"]
        for i, key in enumerate(keys):
            vals = [
                float("nan") if x in failed else results[n]["aggregate"].get(key, 0.0) or 0.0 for x, n in enumerate(inv)
            ]
            ax.bar([x + 0.25 * i for x in range(len(inv))], vals, width=0.25, label=key)
        if failed:
            ax.plot([x + 0.25 for x in failed], [0.05] * len(failed), "x", color="black", ms=12, mew=3, label="n/a")
            for x in failed:
                ax.annotate(results[inv[x]]["status"].replace("_", " "), (x + 0.25, 0.1), ha="center", rotation=90)
        ax.set_xticks([x + 0.25 for x in range(len(inv))], inv)
        ax.set_ylim(0, 1)
        ax.set_title("inversion quality (private texts)")
        ax.legend()
        paths.append(_save(fig, out / f"{stem}-inversion.png"))
    results = scored(results)
    if "alignment" in results:
        sweep = results["alignment"]["aggregate"]["sweep"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ks = [r["k"] for r in sweep]
        ax.plot(ks, [r["mapped_cosine"] for r in sweep], "o-", label="mapped cosine")
        for a in results["alignment"]["observation"]["flags"]["inner_attacks"]:
            ax.plot(ks, [r[a]["token_f1"] for r in sweep], "s--", label=f"{a} token F1")
        ax.set_xscale("log")
        ax.set_xlabel("leaked pairs k")
        ax.set_ylim(0, 1.02)
        ax.set_title("alignment through a secret rotation")
        ax.legend()
        paths.append(_save(fig, out / f"{stem}-alignment.png"))
    if "kb-extract" in results:
        f1 = results["kb-extract"]["aggregate"]["per_item_f1"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(f1, bins=20, range=(0, 1))
        ax.axvline(0.8, color="k", ls="--")
        ax.set_xlabel("token F1 per hidden document")
        ax.set_title("knowledge-base extraction")
        paths.append(_save(fig, out / f"{stem}-kb.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    atomic_write(path, write)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
