"""Audit surface ``kb-secrets``: secrets (PINs, diagnoses, passwords) extracted from a knowledge base's hidden
documents through its search endpoint.

The victim's knowledge base is private-split texts of the audit's corpus with secret records planted from
templates (:mod:`leaklab.threat.kbsecrets`); the attacker knows the templates and public candidate lists and
may only send query texts to the search endpoint, reading back top-k ids with scores, or ids only, as the API
returns them. Each configured score view is one step running the registered ``kb-secrets`` embedding attack
(:mod:`leaklab.attacks.embedding.kbsecrets`) through the runner; the report gives the share of secrets
recovered exactly and the queries spent per secret, per view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
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
from leaklab.threat.kbsecrets import template_of

ATTACK = "kb-secrets"
QUERIES_PER_S = 20.0  # search queries a minilm-sized local index answers per second on 2 shared CPU cores


@dataclass(frozen=True)
class ViewSpec(Config):
    """What the search API returns per hit."""

    scores: bool = option(True, "the API returns similarity scores (false: ids only; the attack uses ranks)")
    score_noise: float = option(0.0, "σ of Gaussian noise added to each returned score")
    score_step: float = option(0.0, "returned scores quantised to multiples of this step (0: off)")

    def __post_init__(self) -> None:
        self.require(non_negative=("score_noise", "score_step"))

    def label(self) -> str:
        from leaklab.service.search_scores import ScoreView

        return ScoreView(self.scores, self.score_noise, self.score_step).label()


@dataclass(frozen=True)
class KbSecretsSection(EncoderTarget):
    """Section ``kb-secrets``: the encoder behind the search endpoint, the planted secrets and the API views."""

    secrets: int = option(12, "secret records planted in the knowledge base")
    kb_docs: int = option(500, "private-split documents of the knowledge base besides the secrets")
    templates: str = option(
        "pin;diagnosis;vpn", "';'-separated secret templates: pin, diagnosis, vpn or texts with {slots}"
    )
    views: tuple[dict, ...] = option(
        lambda: ({"scores": True}, {"scores": False}), "score views of the search API (list of ViewSpec mappings)"
    )
    attack_options: Mapping[str, Any] = option(lambda: {}, "further kb-secrets attack options (leaklab embed attacks)")

    def __post_init__(self) -> None:
        self.require(positive=("secrets", "kb_docs"))
        require_mapping(self.attack_options, "attack_options", "option names")
        if not self.views:
            raise LeaklabError("views must list at least one score view")
        self.view_specs()
        for name in (t.strip() for t in self.templates.split(";")):
            if name:
                template_of(name)

    def view_specs(self) -> list[ViewSpec]:
        return specs_of(ViewSpec, self.views, "kb-secrets.views")

    def attack_config(self, view: ViewSpec, kb_docs: int) -> dict[str, Any]:
        """The attack's options for one view (validated by the attack's own Config)."""
        return {
            **self.attack_options,
            "templates": self.templates,
            "kb_docs": kb_docs,
            "scores": view.scores,
            "score_noise": view.score_noise,
            "score_step": view.score_step,
        }


@AUDIT_SURFACES.register("kb-secrets", config=KbSecretsSection, items={"views": ViewSpec})
class KbSecretsSurface(Surface):
    """Secret records of a knowledge base, extracted through its search endpoint."""

    title = "Knowledge base: secret extraction through search"
    threat_model = (
        "The attacker may only send query texts to the knowledge base's search endpoint and read back the top-k "
        "document ids (with similarity scores where the API returns them). It knows what a secret record looks "
        "like (its template) and public candidate lists for the slots (names, conditions, digits); it never sees "
        "a document."
    )

    @staticmethod
    def preflight(section: KbSecretsSection, options: AuditOptions) -> None:
        section.check_encoder("kb-secrets")
        for i, view in enumerate(section.view_specs()):
            check_embed_attack(ATTACK, section.attack_config(view, section.kb_docs), f"kb-secrets.views[{i}]")

    def plan(self, scale: float) -> Plan:
        sec, o = self.section, self.options
        kb_docs = scaled_count(sec.kb_docs, scale, 100)
        secrets = scaled_count(sec.secrets, scale, 3)
        scaling = []
        if kb_docs < sec.kb_docs or secrets < sec.secrets:
            scaling.append(
                f"kb-secrets: planted secrets {sec.secrets} → {secrets}, KB documents {sec.kb_docs} → {kb_docs}"
            )
        steps = []
        for i, view in enumerate(sec.view_specs()):
            spec = {
                "encoder": sec.encoder,
                "corpus": o.corpus,
                "secrets": secrets,
                "seed": o.seed,
                "options": sec.attack_config(view, kb_docs),
            }
            estimate = 15.0 + kb_docs / 20 + secrets * (100 if view.scores else 15) / QUERIES_PER_S
            steps.append(
                Step(
                    f"view-{i}",
                    f"kb-secrets via {view.label()}",
                    spec,
                    lambda spec=spec: run_embed_attack(ATTACK, spec, spec["secrets"], sec.key()),
                    estimate,
                )
            )
        return Plan(steps, scaling)

    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        rows, evidences, examples = [], [], []
        views = self.section.view_specs()
        for st in steps:
            rec = results.get(st.name)
            if rec is None:
                continue
            view = views[int(st.name.rsplit("-", 1)[1])]
            row = _row(rec, view)
            rows.append(row)
            evidences.append(_evidence(row))
            examples += [
                {
                    "where": row["view"],
                    "private": p["true_text"],
                    "recovered": p["pred_text"] or "(not found)",
                    "score": None,
                }
                for p in rec.get("pairs", [])[:3]
            ]
        evidence = best_evidence(
            evidences, Evidence("unknown", "exact secrets", None, "no view ran (see the time budget section)")
        )
        flags = [
            f"Encoder behind the search endpoint: {self.section.encoder}.",
            "The attacker knows the secret templates and the public candidate lists of their slots (flag: template "
            "known); every query it sends is counted.",
            "Score views audited: " + "; ".join(v.label() for v in views) + ".",
        ]
        if self.section.attack_options.get("encoder_known"):
            flags.append("The attacker also holds the encoder's weights (flag: encoder known).")
        table = {
            "title": "Secrets extracted per search-API view",
            "columns": ["score view", "outcome", "secrets", "exact", "located", "queries/secret", "queries", "seconds"],
            "rows": [
                [
                    r["view"],
                    r["outcome"],
                    fmt(r["secrets"]),
                    _pct(r["exact_share"]),
                    _pct(r["located_share"]),
                    fmt(r["queries_per_secret"], 0),
                    fmt(r["queries"]),
                    fmt(r["seconds"], 1),
                ]
                for r in rows
            ],
        }
        notes = [
            f"The knowledge base holds private-split texts of '{self.options.corpus}' with the secret records "
            f"planted among them (templates: {self.section.templates}); exact = every slot of a record recovered."
        ]
        return report_section(
            evidence,
            flags,
            tables=[table],
            examples=examples,
            notes=notes,
            recommendation=_recommendation(rows),
            data={"views": rows},
        )


def _row(rec: dict[str, Any], view: ViewSpec) -> dict[str, Any]:
    from leaklab.experiments.runner import record_outcome

    m = rec.get("aggregate") or {}
    return {
        "view": view.label(),
        "scores": view.scores,
        "status": rec["status"],
        "reason": rec.get("reason"),
        "outcome": record_outcome(rec),
        "secrets": m.get("secrets"),
        "exact_share": m.get("exact_share"),
        "located_share": m.get("located_share"),
        "exact_by_template": m.get("exact_by_template"),
        "queries_per_secret": m.get("queries_per_secret"),
        "queries": m.get("queries_total"),
        "seconds": rec.get("attack_seconds"),
    }


def _evidence(row: dict[str, Any]) -> Evidence:
    share = row["exact_share"]
    if row["status"] != "recovered" or share is None:
        risk = "low" if row["status"] == "no_signal" else "unknown"
        return Evidence(risk, "exact secrets", None, f"{row['view']}: {row['reason']}")
    detail = f"via {row['view']}, {row['queries_per_secret']:.0f} queries per secret"
    one = 1 / max(row["secrets"] or 1, 1)
    return Evidence(risk_of(share, 0.5, one), "exact secrets", share, detail)


def _recommendation(rows: list[dict[str, Any]]) -> str | None:
    leaking = [r for r in rows if (r["exact_share"] or 0) > 0]
    if not rows:
        return None
    if not leaking:
        return "none needed at the views audited: no secret was recovered exactly"
    if any(not r["scores"] for r in leaking):
        return "keep secrets out of searchable documents: even ids-only answers leak them; rate-limit per key"
    return "return ids only (no scores) and rate-limit per key; better, keep secrets out of searchable documents"


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"
