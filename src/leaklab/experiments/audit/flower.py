"""Audit surface ``flower``: a real Flower federation (Ray simulation engine, leaklab's ClientApp/ServerApp)
whose server runs :class:`leaklab.fl.AuditStrategy`: every client update the server receives is attacked and
scored against that client's private batch.

One step per configured Flower defense (``none``, ``server-dp``, ``local-dp``, ``secagg+`` with options): a
small simulation (clients, rounds, setting from the section) of the audit's corpus, with ROUGE-1 per round and
client and the global model's validation loss per round (utility).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.experiments.audit.common import best_evidence, fmt, prefixed, report_section, require_mapping, risk_of
from leaklab.experiments.audit.config import AuditOptions, require_causal_lm
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, Evidence, Plan, Step, Surface

STARTUP_S = 30.0  # Ray and the Flower simulation engine starting and stopping


@dataclass(frozen=True)
class FlowerSection(Config):
    """Section ``flower``: the federation simulated and the Flower defenses compared."""

    model: str = option("smollm2-135m", "the federated model: packaged name, Hugging Face folder or hub name")
    clients: int = option(2, "clients (Flower SuperNodes); all train every round")
    rounds: int = option(1, "federated rounds")
    batch_size: int = option(2, "private texts per client per round")
    setting: Literal["fedsgd", "fedavg", "lora"] = option("fedsgd", "what a client runs on its batch")
    lr: float = option(0.01, "client SGD learning rate")
    local_steps: int = option(1, "local SGD steps (fedavg, lora)")
    lora_r: int = option(8, "LoRA rank (lora)")
    attack: str = option("somp", "gradient attack the server-side auditor runs on each captured update")
    attack_options: Mapping[str, Any] = option(lambda: {"budget_s": 60}, "the attack's options")
    defenses: tuple[str, ...] = option(
        ("none",), "Flower defenses compared, one simulation each: none, server-dp, local-dp, secagg+ (name:k=v,...)"
    )
    val_texts: int = option(8, "public-split texts the server scores the global model on each round (utility)")

    def __post_init__(self) -> None:
        self.require(positive=("clients", "rounds", "batch_size"), non_negative=("val_texts",))
        require_mapping(self.attack_options, "attack_options", "option names")
        if not self.defenses:
            raise LeaklabError("defenses must list at least one Flower defense (none for an undefended run)")

    def run_config(self, options: AuditOptions, defense: str) -> dict[str, Any]:
        """The :class:`leaklab.fl.FlRun` of one simulation, as a dict."""
        import json

        budget = self.attack_options.get("budget_s")
        return {
            "model": self.model,
            "corpus": options.corpus,
            "clients": self.clients,
            "rounds": self.rounds,
            "batch_size": self.batch_size,
            "setting": self.setting,
            "lr": self.lr,
            "local_steps": self.local_steps,
            "lora_r": self.lora_r,
            "min_tokens": options.min_tokens,
            "max_tokens": options.max_tokens,
            "seed": options.seed,
            "attacks": self.attack,
            "attack_options": json.dumps({self.attack: dict(self.attack_options)}),
            **({"attack_budget_s": float(budget)} if budget is not None else {}),
            "capture": "both",
            "defense": defense,
            "val_texts": self.val_texts,
        }


@AUDIT_SURFACES.register("flower", config=FlowerSection)
class FlowerSurface(Surface):
    """Federated training on Flower, audited at the server."""

    title = "Flower federated training (server-side gradient inversion)"
    threat_model = (
        "The Flower server (honest-but-curious) receives each client's reply to the global model it sent and "
        "knows the model, the learning rate and the number of examples (the protocol tells it). Each client's "
        "private batch never leaves the client."
    )

    @staticmethod
    def preflight(section: FlowerSection, options: AuditOptions) -> None:
        import importlib.util

        if importlib.util.find_spec("flwr") is None:
            raise LeaklabError("flower: Flower (flwr) is not installed")
        from leaklab.fl.config import FlRun

        require_causal_lm(section.model, "flower.model")
        for i, defense in enumerate(section.defenses):
            with prefixed(f"flower.defenses[{i}]"):
                FlRun(**section.run_config(options, defense))

    def plan(self, scale: float) -> Plan:
        from leaklab.models.registry import PACKAGED

        sec = self.section
        spec_model = PACKAGED.get(sec.model)
        per_update = float(sec.attack_options.get("budget_s", 60)) if not (spec_model and spec_model.random_init) else 5
        estimate = STARTUP_S + sec.clients * sec.rounds * (per_update + 5)
        steps = []
        for i, defense in enumerate(sec.defenses):
            spec = sec.run_config(self.options, defense)
            steps.append(
                Step(
                    f"run-{i}",
                    f"{sec.clients} clients × {sec.rounds} rounds, defense {defense}",
                    spec,
                    lambda spec=spec: _simulate_step(spec),
                    estimate,
                )
            )
        return Plan(steps, [])

    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        thr = self.options.leak_threshold
        runs = [_run_row(st.spec["defense"], results[st.name], thr) for st in steps if st.name in results]
        evidences = []
        for r in runs:
            if r["rouge1"] is not None:
                evidences.append(
                    Evidence(risk_of(r["rouge1"], 0.5, thr), "client ROUGE-1", r["rouge1"], f"defense {r['defense']}")
                )
            elif r["clients"]:
                evidences.append(Evidence("low", "client ROUGE-1", None, f"defense {r['defense']}: nothing recovered"))
        undefended = [e for e, r in zip(evidences, runs, strict=False) if r["defense"] == "none"]
        fallback = Evidence("unknown", "client ROUGE-1", None, "no simulation ran (see the time budget section)")
        evidence = best_evidence(undefended or evidences, fallback)
        per_client = []
        for st in steps:
            if st.name in results:
                per_client += _client_rows(st.spec["defense"], results[st.name])
        tables = [
            {
                "title": "Per simulation",
                "columns": [
                    "defense",
                    "updates attacked",
                    "max ROUGE-1",
                    "mean ROUGE-1",
                    "ε",
                    "final val loss",
                    "seconds",
                ],
                "rows": [
                    [
                        r["defense"],
                        str(r["clients"]),
                        fmt(r["rouge1"]),
                        fmt(r["mean_rouge1"]),
                        fmt(r["epsilon"], 2),
                        fmt(r["val_loss"]),
                        fmt(r["seconds"], 0),
                    ]
                    for r in runs
                ],
            },
            {
                "title": "Per client and round",
                "columns": ["defense", "round", "client", "ROUGE-1", "token F1", "outcome"],
                "rows": [
                    [
                        c["defense"],
                        str(c["round"]),
                        str(c["target"]),
                        fmt(c["rouge1"]),
                        fmt(c["token_f1"]),
                        c["outcome"],
                    ]
                    for c in per_client
                ],
            },
        ]
        examples = []
        for st in steps[:1]:
            for rec in (results.get(st.name) or {}).get("records", [])[:2]:
                examples += [
                    {
                        "where": f"round {rec['round']}, client {rec['target']}",
                        "private": p["true_text"],
                        "recovered": p["pred_text"],
                        "score": p.get("rouge1"),
                    }
                    for p in rec.get("pairs", [])[:2]
                ]
        sec = self.section
        flags = [
            f"{sec.clients} clients × {sec.rounds} rounds of {sec.setting} (B = {sec.batch_size}, lr {sec.lr:g}) "
            f"on {sec.model}.",
            "The server knows the global weights it sent, the learning rate and each client's example count.",
            "Under secagg+ the server sees only the sum of the clients' updates; under server-dp the auditor sees "
            "each clipped update before the server's noise (view inside) unless configured otherwise.",
        ]
        notes = [
            f"Each client holds a disjoint shard of the private split of '{self.options.corpus}'; the auditor runs "
            f"{sec.attack} on every captured client update (Flower's Ray simulation engine, real ClientApps)."
        ]
        return report_section(
            evidence,
            flags,
            tables=tables,
            examples=examples,
            notes=notes,
            recommendation=_recommend(runs, thr),
            data={"runs": runs, "per_client": per_client},
        )


def _simulate_step(spec: dict[str, Any]) -> dict[str, Any]:
    from leaklab.fl.config import FlRun
    from leaklab.fl.simulate import simulate

    summary = simulate(FlRun.from_dict(spec, "flower"), num_cpus=2, client_cpus=1.0)
    for rec in summary["records"]:
        rec.pop("recovered", None)  # the pairs keep a few examples; the report needs no more
    return summary


def _client_rows(defense: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    from leaklab.fl.report import result_rows

    names: dict[str, str] = {}
    rows = []
    for r in result_rows(summary["records"]):
        target = (
            r["target"] if r["target"] == "aggregate" else names.setdefault(r["target"], f"client {len(names) + 1}")
        )
        rows.append({"defense": defense, **r, "target": target})
    return rows


def _run_row(defense: str, summary: dict[str, Any], thr: float) -> dict[str, Any]:
    rows = _client_rows(defense, summary)
    scores = [r["rouge1"] for r in rows if r["rouge1"] is not None]
    util = summary.get("utility") or {}
    return {
        "defense": defense,
        "clients": len(rows),
        "rouge1": max(scores) if scores else None,
        "mean_rouge1": sum(scores) / len(scores) if scores else None,
        "epsilon": (summary.get("defense") or {}).get("epsilon_total"),
        "val_loss": util[max(util, key=int)] if util else None,
        "seconds": summary.get("seconds"),
        "stopped": bool(rows) and (not scores or max(scores) <= thr),
    }


def _recommend(runs: list[dict[str, Any]], thr: float) -> str | None:
    if any(r["defense"] == "none" and r["stopped"] for r in runs):
        return f"none needed: the undefended federation's updates are already at ROUGE-1 ≤ {thr}"
    ok = [r for r in runs if r["defense"] != "none" and r["stopped"]]
    if not ok:
        return f"no Flower defense compared brought the attack to ROUGE-1 ≤ {thr}" if len(runs) > 1 else None
    best = min(ok, key=lambda r: r["val_loss"] if r["val_loss"] is not None else float("inf"))
    return f"{best['defense']}: client updates at ROUGE-1 ≤ {thr}, final validation loss {fmt(best['val_loss'])}"
