"""A Flower run's results: the summary, ``results.md`` (round × client: ROUGE-1/2, token F1, outcome) and
``leakage.png`` (leakage per round), written to the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leaklab.fl.audit import Auditor
from leaklab.fl.config import FlRun, defense_of
from leaklab.io import atomic_write, atomic_write_json


def summarise_run(run: FlRun, auditor: Auditor, seconds: float) -> dict[str, Any]:
    name, opts = defense_of(run.defense)
    return {
        "run": run.to_dict(),
        "defense": {"name": name, **opts.to_dict(), **_epsilon(run)},
        "seconds": round(seconds, 2),
        "utility": {str(k): v for k, v in sorted(auditor.utility.items())},
        "replies": {str(k): v for k, v in sorted(auditor.replies.items())},
        "missing_replies": missing_replies(run, auditor.replies),
        "records": auditor.records,
    }


def missing_replies(run: FlRun, replies: dict[int, int]) -> dict[str, int]:
    """Clients that did not reply, per round; a round with no aggregate (no client replied) misses them all."""
    counts = {r: replies.get(r, 0) for r in range(1, run.rounds + 1)}
    return {str(r): run.clients - n for r, n in counts.items() if n < run.clients}


def _epsilon(run: FlRun) -> dict[str, Any]:
    """ε of the run's DP: LocalDpMod's per-release ε composed over rounds (basic composition); for server-side
    DP the Gaussian mechanism's RDP ε without sampling amplification (Flower's own accountant needs flwr[dp])."""
    name, opts = defense_of(run.defense)
    if name == "local-dp":
        return {
            "epsilon_per_round": opts.epsilon,
            "epsilon_total": opts.epsilon * run.rounds,
            "epsilon_source": "LocalDpMod's ε per release, composed over rounds",
        }
    if name == "server-dp" and opts.noise > 0:
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(opts.noise, 1.0, run.rounds)]
        return {
            "epsilon_total": acc.get_epsilon(opts.delta),
            "delta": opts.delta,
            "epsilon_source": "RDP of the Gaussian mechanism, sample rate 1 (Opacus accountant)",
        }
    return {}


def result_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """round × target × attack: ROUGE-1/2, token F1 and the outcome (n/a with its reason when not recovered)."""
    rows = []
    for r in records:
        agg = r.get("aggregate") or {}
        rows.append(
            {
                "round": r["round"],
                "target": r["target"],
                "attack": r["attack"],
                "rouge1": agg.get("rouge1"),
                "rouge2": agg.get("rouge2"),
                "token_f1": agg.get("token_f1"),
                "outcome": r["outcome"],
                "texts": (r.get("observation") or {}).get("batch_size"),
            }
        )
    return rows


def cell(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def results_markdown(summary: dict[str, Any]) -> str:
    run = summary["run"]
    lines = [
        f"# Flower run: {run['model']}, {run['clients']} clients × {run['rounds']} rounds, B={run['batch_size']}, "
        f"{run['setting']}, defense {summary['defense']['name']}",
        "",
        f"Wall time {summary['seconds']} s. Validation loss per round: "
        + (", ".join(f"{k}: {v:.4f}" for k, v in summary["utility"].items()) or "not measured"),
        "",
        "| round | target | attack | texts | ROUGE-1 | ROUGE-2 | token F1 | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result_rows(summary["records"]):
        lines.append(
            f"| {r['round']} | {r['target']} | {r['attack']} | {cell(r['texts'])} | {cell(r['rouge1'])} | "
            f"{cell(r['rouge2'])} | {cell(r['token_f1'])} | {r['outcome']} |"
        )
    return "\n".join(lines) + "\n"


def plot_leakage(summary: dict[str, Any], path: Path) -> None:
    """Mean ROUGE-1 per round and attack, clients and aggregate apart; a round with nothing recovered is drawn
    as a cross at 0 labelled n/a (never a score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result_rows(summary["records"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    series: dict[tuple[str, str], dict[int, list[float | None]]] = {}
    for r in rows:
        kind = "aggregate" if r["target"] == "aggregate" else "clients"
        series.setdefault((r["attack"], kind), {}).setdefault(r["round"], []).append(r["rouge1"])
    for (attack, kind), by_round in sorted(series.items()):
        xs = sorted(by_round)
        scored = [(x, [v for v in by_round[x] if v is not None]) for x in xs]
        pts = [(x, sum(v) / len(v)) for x, v in scored if v]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{attack} · {kind}")
        for x, v in scored:
            if not v:
                ax.scatter([x], [0], marker="x", color="black")
                ax.annotate("n/a", (x, 0), textcoords="offset points", xytext=(4, 4), fontsize=7)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean ROUGE-1 (recovered)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"leakage per round ({summary['defense']['name']})", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # not when every update came back n/a
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_run_folder(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(out / "summary.json", summary)
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(results_markdown(summary), encoding="utf-8"))
    plot_leakage(summary, out / "leakage.png")
