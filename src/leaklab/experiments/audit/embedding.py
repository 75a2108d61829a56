"""Audit surface ``embedding``: what an attacker learns from an encoder's vectors or its search endpoint.

The battery runs registered embedding attacks (:data:`leaklab.attacks.embedding.registry.EMBED_ATTACKS`)
through the runner (:func:`run_embedding`): by default inversion of leaked vectors (``bow``), knowledge-base
extraction through a search endpoint (``kb-extract``) and knowledge-base membership (``membership``), each
with the attacker's query counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leaklab.core import Config, option
from leaklab.experiments.audit.common import (
    EncoderTarget,
    best_evidence,
    check_embed_attack,
    fmt,
    report_section,
    require_mapping,
    risk_of,
    run_embed_attack,
    scaled_count,
    specs_of,
)
from leaklab.experiments.audit.config import AuditOptions
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, Evidence, Plan, Step, Surface

#: (metric path, high, medium) deciding each attack family's risk
RISK_RULES = {
    "membership": ("exact_query.auc", 0.8, 0.6),
    "nearest": ("presence_auc", 0.8, 0.6),
    "kb-extract": ("token_f1", 0.5, None),
}
METRIC_NAMES = {"exact_query.auc": "membership AUC", "presence_auc": "presence AUC", "token_f1": "token F1"}
INVERSION_RULE = ("token_f1", 0.5, None)  # None: the audit's leak threshold


@dataclass(frozen=True)
class AttackSpec(Config):
    """One embedding attack and its options."""

    attack: str = option("bow", "embedding attack (leaklab embed attacks)")
    options: Mapping[str, Any] = option(lambda: {}, "the attack's options")

    def __post_init__(self) -> None:
        require_mapping(self.options, "options", "option names")


@dataclass(frozen=True)
class EmbeddingSection(EncoderTarget):
    """Section ``embedding``: an encoder (or a live endpoint) and the attacks run against it."""

    targets: int = option(20, "private texts embedded (leaked vectors / indexed documents)")
    attacks: tuple[dict, ...] = option(
        lambda: (
            {"attack": "bow", "options": {"train_seconds": 60}},
            {"attack": "kb-extract"},
            {"attack": "membership"},
        ),
        "attacks (list of AttackSpec mappings)",
    )

    def __post_init__(self) -> None:
        self.require(positive=("targets",))
        self.attack_specs()

    def attack_specs(self) -> list[AttackSpec]:
        return specs_of(AttackSpec, self.attacks, "embedding.attacks")


@AUDIT_SURFACES.register("embedding", config=EmbeddingSection, items={"attacks": AttackSpec})
class EmbeddingSurface(Surface):
    """Embedding vectors and search endpoints (inversion, knowledge-base extraction, membership)."""

    title = "Embeddings and search (inversion, KB extraction, membership)"
    threat_model = (
        "The attacker holds leaked vectors of private texts, or query access to a search endpoint over them, "
        "plus public text of the same kind; it may embed its own texts with the same encoder (every query "
        "counted). It never sees the private texts."
    )

    @staticmethod
    def preflight(section: EmbeddingSection, options: AuditOptions) -> None:
        section.check_encoder("embedding")
        for i, a in enumerate(section.attack_specs()):
            check_embed_attack(a.attack, a.options, f"embedding.attacks[{i}]")

    def plan(self, scale: float) -> Plan:
        sec, o = self.section, self.options
        targets = scaled_count(sec.targets, scale, 4)
        scaling = [f"embedding: private targets {sec.targets} → {targets}"] if targets < sec.targets else []
        steps = []
        for i, a in enumerate(sec.attack_specs()):
            opts = dict(a.options)
            train = _train_seconds(a)
            if train is not None and scale < 1:
                opts["train_seconds"] = max(10.0, round(train * scale, 1))
                scaling.append(f"embedding: {a.attack} training time {train:g} s → {opts['train_seconds']:g} s")
            spec = {
                "encoder": sec.encoder,
                "attack": a.attack,
                "options": opts,
                "corpus": o.corpus,
                "n": targets,
                "seed": o.seed,
                "max_tokens": o.max_tokens,
            }
            estimate = 2 * (opts.get("train_seconds") or 30.0) + 60.0
            steps.append(
                Step(
                    f"attack-{i}",
                    f"{a.attack} on {sec.encoder}",
                    spec,
                    lambda spec=spec: run_embed_attack(spec["attack"], spec, spec["n"], sec.key()),
                    estimate,
                )
            )
        return Plan(steps, scaling)

    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        thr = self.options.leak_threshold
        rows, examples, evidences = [], [], []
        for st in steps:
            rec = results.get(st.name)
            if rec is None:
                continue
            rows.append(_row(rec))
            evidences.append(_evidence(rec, thr))
            examples += [
                {
                    "where": rec["attack"],
                    "private": p.get("true_text", ""),
                    "recovered": p.get("pred_text", ""),
                    "score": None,
                }
                for p in rec.get("pairs", [])[:3]
            ]
        evidence = best_evidence(
            evidences, Evidence("unknown", "token F1", None, "no attack ran (see the time budget section)")
        )
        access = self.section.encoder
        flags = [
            f"Encoder under audit: {access}" + (" (a live endpoint: black-box only)" if "://" in access else ""),
            "Inversion: the attacker trains only on public-split texts it embeds itself (queries counted).",
            "KB extraction and membership: the attacker sees only (id, score) results of its search queries.",
        ]
        table = {
            "title": "Embedding attacks",
            "columns": [
                "attack",
                "outcome",
                "token F1",
                "ROUGE-L",
                "AUC",
                "TPR@1%FPR",
                "recovered share",
                "attacker queries",
                "seconds",
            ],
            "rows": [
                [
                    r["attack"],
                    r["outcome"],
                    fmt(r["token_f1"]),
                    fmt(r["rougeL"]),
                    fmt(r["auc"]),
                    fmt(r["tpr"]),
                    fmt(r["recovered_share"]),
                    str(r["queries"]),
                    fmt(r["seconds"]),
                ]
                for r in rows
            ],
        }
        notes = [
            f"Private targets are drawn from the private split of '{self.options.corpus}'; membership uses "
            "a random halving of private texts (members indexed, non-members not)."
        ]
        return report_section(evidence, flags, tables=[table], examples=examples, notes=notes, data={"attacks": rows})


def _train_seconds(a: AttackSpec) -> float | None:
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS

    cfg = EMBED_ATTACKS.get(a.attack).options(a.options)
    value = getattr(cfg, "train_seconds", None)
    return float(value) if value is not None else None


def _get(metrics: dict[str, Any] | None, path: str) -> float | None:
    value: Any = metrics or {}
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _first(metrics: dict[str, Any], *paths: str) -> float | None:
    values = [_get(metrics, p) for p in paths]
    return next((v for v in values if v is not None), None)


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    from leaklab.experiments.runner import record_outcome

    m = rec.get("aggregate") or {}
    usage = (rec.get("info") or {}).get("usage") or {}
    queries = usage.get("search_queries", usage.get("queries", "–"))
    return {
        "attack": rec["attack"],
        "outcome": record_outcome(rec),
        "token_f1": _get(m, "token_f1"),
        "rougeL": _get(m, "rougeL"),
        "auc": _first(m, "exact_query.auc", "presence_auc"),
        "tpr": _first(m, "exact_query.tpr_at_1pct_fpr", "presence_tpr_at_1pct_fpr"),
        "recovered_share": _get(m, "recovered_share"),
        "queries": queries,
        "seconds": rec.get("attack_seconds"),
    }


def _evidence(rec: dict[str, Any], thr: float) -> Evidence:
    metric, high, medium = RISK_RULES.get(rec["attack"], INVERSION_RULE)
    value = _get(rec.get("aggregate"), metric)
    name = METRIC_NAMES[metric]
    if rec["status"] != "recovered":
        risk = "low" if rec["status"] == "no_signal" else "unknown"
        return Evidence(risk, name, None, f"{rec['attack']}: {rec.get('reason')}")
    return Evidence(risk_of(value, high, medium if medium is not None else thr), name, value, rec["attack"])
