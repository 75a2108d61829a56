"""Audit surface ``api-defenses``: which defense of the embedding API stops an adaptive attacker, and what
it costs the API's users (:mod:`leaklab.service.defend_eval`).

The attacker has its own API key (its own tenant) and public text, so it retrains its probes on vectors
defended exactly as the API defends them. A point counts as stopping it when the bag-of-words probe's token
F1 on the victim's leaked vectors is at or below the threshold; the recommended defense keeps the most label
precision@10 (the victim's own retrieval quality) among those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.experiments.audit.common import (
    EncoderTarget,
    embedded_plot,
    fmt,
    new_figure,
    prefixed,
    report_section,
    require_mapping,
    risk_of,
    scaled_count,
    specs_of,
)
from leaklab.experiments.audit.config import AuditOptions
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, Evidence, Plan, Step, Surface

DEFAULT_DEFENSES = (
    {"kind": "gaussian", "param": "epsilon", "values": [300, 1000, 3000], "params": {"delta": 1e-5}},
    {"kind": "quantise", "param": "bits", "values": [1, 2, 4], "params": {"clip": 0.25}},
    {"kind": "truncate", "param": "dims", "values": [8, 32, 128]},
)


@dataclass(frozen=True)
class ApiDefenseSpec(Config):
    """One API defense swept over one parameter."""

    kind: str = option("gaussian", "API defense: gaussian, metric-dp, quantise, truncate, rotate")
    param: str | None = option(None, "the parameter swept (none: one point)")
    values: tuple[float, ...] = option((), "its values")
    params: Mapping[str, Any] = option(lambda: {}, "fixed parameters")

    def __post_init__(self) -> None:
        require_mapping(self.params, "params", "parameter names")

    def pipelines(self) -> list[tuple[Any, list[dict[str, Any]]]]:
        """(value, defense specs of :func:`make_pipeline`) per point."""
        if self.param is None:
            return [(None, [{"kind": self.kind, **self.params}])]
        if not self.values:
            raise LeaklabError(f"give the values of {self.param} to sweep")
        return [(v, [{"kind": self.kind, **self.params, self.param: _num(v)}]) for v in self.values]


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


@dataclass(frozen=True)
class ApiDefenseSection(EncoderTarget):
    """Section ``api-defenses``: the encoder behind the API, the sample sizes and the defenses swept."""

    victims: int = option(100, "victim documents whose vectors leak")
    public: int = option(1000, "public texts the attacker embeds to train its probe")
    known_pairs: int = option(0, "victim-tenant (text, vector) pairs the attacker also holds (flag)")
    defenses: tuple[dict, ...] = option(lambda: DEFAULT_DEFENSES, "defenses (list of ApiDefenseSpec mappings)")

    def __post_init__(self) -> None:
        self.require(positive=("victims", "public"), non_negative=("known_pairs",))
        self.specs()

    def specs(self) -> list[ApiDefenseSpec]:
        return specs_of(ApiDefenseSpec, self.defenses, "api-defenses.defenses")


@AUDIT_SURFACES.register("api-defenses", config=ApiDefenseSection, items={"defenses": ApiDefenseSpec})
class ApiDefenseSurface(Surface):
    """Defenses of an embedding API against an adaptive attacker, with their utility cost."""

    title = "Embedding API defenses (adaptive attacker)"
    threat_model = (
        "Vectors the API returned to the victim leak. The attacker has its own API key and public text, and "
        "retrains its probe on vectors defended exactly as the API defends them (adaptive)."
    )

    @staticmethod
    def preflight(section: ApiDefenseSection, options: AuditOptions) -> None:
        from leaklab.service.defenses import make_pipeline

        section.check_encoder("api-defenses")
        for i, s in enumerate(section.specs()):
            with prefixed(f"api-defenses.defenses[{i}]"):
                for _, specs in s.pipelines():
                    make_pipeline(specs)

    def plan(self, scale: float) -> Plan:
        sec, o = self.section, self.options
        public = scaled_count(sec.public, scale, 200)
        victims = scaled_count(sec.victims, scale, 30)
        scaling = []
        if public < sec.public or victims < sec.victims:
            scaling.append(
                f"api-defenses: victim documents {sec.victims} → {victims}, attacker public texts "
                f"{sec.public} → {public}"
            )
        points = [("none", None, [])] + [(s.kind, v, p) for s in sec.specs() for v, p in s.pipelines()]
        spec = {
            "encoder": sec.encoder,
            "corpus": o.corpus,
            "victims": victims,
            "public": public,
            "seed": o.seed,
            "known_pairs": sec.known_pairs,
            "points": points,
        }
        estimate = (victims + public) / 25 + 5 * len(points)
        step = Step(
            "sweep",
            f"API defenses on {sec.encoder}",
            spec,
            lambda: _sweep_step(spec, sec.key()),
            estimate,
        )
        return Plan([step], scaling)

    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        thr = self.options.leak_threshold
        res = results.get("sweep")
        if res is None:
            return report_section(
                Evidence("unknown", "BoW token F1", None, "the sweep did not run (see the time budget section)"), []
            )
        rows = res["rows"]
        base = next(r for r in rows if r["family"] == "none")
        for r in rows:
            f1 = r.get("bow_token_f1")
            r["stopped"] = r["family"] != "none" and r["status"] == "recovered" and f1 is not None and f1 <= thr
        f1 = base.get("bow_token_f1")
        safe = base["status"] == "recovered" and f1 is not None and f1 <= thr
        ok = [r for r in rows if r["stopped"]]
        best = max(ok, key=lambda r: r["label_precision@10"]) if ok and not safe else None
        evidence = Evidence(
            risk_of(f1, 0.5, thr),
            "BoW token F1",
            f1,
            f"undefended API, adaptive probe (prior without vectors: {res['prior_f1']:.3f})",
        )
        if base["status"] != "recovered":
            evidence = Evidence("unknown", "BoW token F1", None, base.get("reason") or "")
        table = {
            "title": f"API defenses (stopped: BoW token F1 ≤ {thr})",
            "columns": ["defense", "label P@10", "neighbour R@10", "BoW token F1", "NN re-id", ""],
            "rows": [
                [
                    r["defense"],
                    f"{r['label_precision@10']:.3f}",
                    f"{r['neighbour_recall@10']:.3f}",
                    fmt(r.get("bow_token_f1")),
                    fmt(r.get("nn_reidentification")),
                    "recommended" if r is best else ("stopped" if r["stopped"] else ""),
                ]
                for r in rows
            ],
        }
        flags = [
            "Adaptive: the attacker's probe is retrained on vectors defended as the API defends them.",
            f"The attacker holds {self.section.known_pairs} victim-tenant (text, vector) pairs.",
            "The victim's documents are among the attacker's candidates for re-identification (dictionary attack).",
        ]
        recommendation = (
            f"{best['defense']} stops the adaptive probe (token F1 {best['bow_token_f1']:.3f}) keeping label "
            f"P@10 {best['label_precision@10']:.3f} (undefended {base['label_precision@10']:.3f})"
            if best
            else f"none needed: the undefended API already keeps the probe at token F1 ≤ {thr}"
            if safe
            else f"no swept API defense brought the probe to token F1 ≤ {thr}"
        )
        return report_section(
            evidence,
            flags,
            tables=[table],
            plots=[_plot(rows, best, thr, res["prior_f1"])],
            notes=[
                f"{res['victims']} victim documents (private split) and {res['public']} attacker texts (public "
                f"split) of '{self.options.corpus}'; {res['queries']} texts embedded."
            ],
            recommendation=recommendation,
            data={"rows": rows, "prior_f1": res["prior_f1"]},
        )


def _sweep_step(spec: dict[str, Any], key: str | None) -> dict[str, Any]:
    from leaklab.encoders import load_encoder
    from leaklab.service.defend_eval import prepare, prior_f1, run_sweep

    enc = load_encoder(spec["encoder"], api_key=key)
    before = enc.usage.snapshot()
    data = prepare(enc.embed, spec["corpus"], spec["victims"], spec["public"], spec["seed"])
    rows = run_sweep(data, spec["points"], spec["seed"], (spec["known_pairs"],))
    return {
        "rows": rows,
        "prior_f1": prior_f1(data),
        "victims": spec["victims"],
        "public": spec["public"],
        "queries": enc.usage.since(before)["queries"],
    }


def _plot(rows: list[dict[str, Any]], best: dict[str, Any] | None, thr: float, prior: float) -> dict[str, str]:
    fig, ax = new_figure()
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    for k, fam in enumerate(families):
        pts = [r for r in rows if r["family"] == fam and r.get("bow_token_f1") is not None]
        ax.plot(
            [r["label_precision@10"] for r in pts],
            [r["bow_token_f1"] for r in pts],
            "o-" if len(pts) > 1 else "s",
            color=plt.get_cmap("tab10")(k),
            label=fam,
        )
    failed = [r for r in rows if r.get("bow_token_f1") is None]
    if failed:
        ax.plot(
            [r["label_precision@10"] for r in failed],
            [0.01] * len(failed),
            "x",
            color="black",
            label="n/a: attacker could not run",
        )
    ax.axhline(thr, color="grey", ls=":", label=f"threshold {thr}")
    ax.axhline(prior, color="tab:brown", ls="--", lw=0.8, label="prior (no vector)")
    if best is not None:
        ax.plot(
            [best["label_precision@10"]],
            [best["bow_token_f1"]],
            "*",
            ms=18,
            color="gold",
            mec="black",
            label="recommended",
            zorder=5,
        )
    ax.set_xlabel("utility: label precision@10 (higher is better)")
    ax.set_ylabel("adaptive BoW probe token F1")
    ax.set_ylim(0, max(0.6, float(np.nanmax([r.get("bow_token_f1") or 0 for r in rows])) + 0.05))
    ax.legend(fontsize=7)
    ax.set_title("privacy–utility of the API defenses")
    return embedded_plot(fig, "Privacy–utility: API defenses")
