"""Audit surface ``gradient``: what a server reconstructs from a client's shared update, per training setting,
and which defense stops it at what utility cost.

The battery: the configured gradient attack (only an Observation reaches it: :func:`attack_batch`) on seeded
private batches for each setting (FedSGD, FedAvg, LoRA, DPO, with batch size, learning rate, local steps and
clients), then a sweep of each configured defense on one setting. The recommended mitigation is the point,
over all defenses, that brings the attack's ROUGE-1 to the threshold or below (or leaves it no signal) at the
smallest utility cost (Δ validation loss on public texts against the undefended update).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.experiments.audit.common import (
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
from leaklab.experiments.audit.config import AuditOptions, require_causal_lm
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, Evidence, Plan, Step, Surface

SERVER_LR = 1e-3
UTILITY_TEXTS = 16


@dataclass(frozen=True)
class SettingSpec(Config):
    """One training setting of the system under audit."""

    setting: str = option("fedsgd", "threat setting: fedsgd, fedavg, lora, dpo, reward (leaklab gradient settings)")
    batch_size: int = option(4, "private texts per client update (pairs for dpo/reward)")
    learning_rate: float | None = option(None, "local SGD learning rate (fedavg, or lora/dpo sharing a delta)")
    local_steps: int = option(1, "local optimiser steps behind one update (with a learning rate)")
    clients: int = option(1, "clients whose updates the server sees only aggregated (> 1: secure aggregation)")
    options: Mapping[str, Any] = option(lambda: {}, "the setting's own options, e.g. {r: 8} for lora")

    def __post_init__(self) -> None:
        self.require(positive=("batch_size", "local_steps", "clients"))
        require_mapping(self.options, "options", "option names")
        if self.setting == "fedsgd" and (self.learning_rate is not None or self.local_steps != 1):
            raise LeaklabError("fedsgd shares one gradient: learning_rate and local_steps belong to fedavg")
        if self.setting == "fedavg" and self.learning_rate is None:
            raise LeaklabError("fedavg needs a learning_rate")

    def flags(self) -> Any:
        from leaklab.threat import ThreatFlags

        return ThreatFlags(local_steps=self.local_steps, learning_rate=self.learning_rate)

    def resolved(self) -> tuple[str, dict[str, Any]]:
        """The registered setting and its options (secure aggregation wraps the setting for clients > 1)."""
        if self.clients > 1:
            return "secagg", {**self.options, "inner": self.setting, "clients": self.clients}
        return self.setting, dict(self.options)

    def label(self) -> str:
        parts = [self.setting, f"B={self.batch_size}"]
        parts += [f"{k}={v}" for k, v in self.options.items()]
        if self.learning_rate is not None:
            parts += [f"lr={self.learning_rate:g}", f"steps={self.local_steps}"]
        if self.clients > 1:
            parts.append(f"clients={self.clients}")
        return " ".join(parts)


@dataclass(frozen=True)
class DefenseSpec(Config):
    """One defense swept over its strength values."""

    defense: str = option("gaussian", "defense name (leaklab gradient defenses)")
    param: str | None = option(None, "the strength parameter swept (default: the defense's own)")
    values: tuple[float, ...] = option((), "strength values, weakest first")
    params: Mapping[str, Any] = option(lambda: {}, "fixed parameters, e.g. {max_norm: 1} for dpsgd")

    def __post_init__(self) -> None:
        require_mapping(self.params, "params", "parameter names")


@dataclass(frozen=True)
class GradientSection(Config):
    """Section ``gradient``: a model trained collaboratively, its settings, the attack and the defenses."""

    model: str = option("smollm2-135m", "the shared model: packaged name, Hugging Face folder or hub name (causal LM)")
    attack: str = option("somp", "gradient attack (leaklab gradient attacks)")
    attack_options: Mapping[str, Any] = option(lambda: {"budget_s": 60}, "the attack's options")
    batches: int = option(1, "private batches attacked per setting (seeds seed, seed+1, ...)")
    settings: tuple[dict, ...] = option(
        lambda: ({"setting": "fedsgd", "batch_size": 4},), "training settings (list of SettingSpec mappings)"
    )
    defenses: tuple[dict, ...] = option((), "defenses to sweep (list of DefenseSpec mappings)")
    sweep_setting: int = option(0, "index in settings of the setting the defense sweeps run on")
    sweep_batches: int = option(1, "private batches per sweep point")
    sweep_attack: str = option(
        "", "the attack on the defended sweep points (default: attack); somp-adaptive knows each defense"
    )

    @property
    def defended_attack(self) -> str:
        return self.sweep_attack or self.attack

    def __post_init__(self) -> None:
        self.require(positive=("batches", "sweep_batches"))
        require_mapping(self.attack_options, "attack_options", "option names")
        if not self.settings:
            raise LeaklabError("settings must list at least one training setting")
        specs = self.setting_specs()
        if self.defenses and not 0 <= self.sweep_setting < len(specs):
            raise LeaklabError(f"sweep_setting {self.sweep_setting} is not an index of settings (0..{len(specs) - 1})")
        self.defense_specs()

    def setting_specs(self) -> list[SettingSpec]:
        return specs_of(SettingSpec, self.settings, "gradient.settings")

    def defense_specs(self) -> list[DefenseSpec]:
        return specs_of(DefenseSpec, self.defenses, "gradient.defenses")


def _defense_points(spec: DefenseSpec) -> list[tuple[str | None, Any, dict[str, Any]]]:
    """(strength parameter, value, defense parameters) per sweep point; one point for a defense without a
    strength parameter."""
    from leaklab.sweep import strength_param

    param = strength_param(spec.defense, spec.param)
    if param is None:
        if spec.values:
            raise LeaklabError(f"defense '{spec.defense}' has no strength parameter: give no values")
        return [(None, None, dict(spec.params))]
    if not spec.values:
        raise LeaklabError(f"defense '{spec.defense}': give the values of {param} to sweep")
    return [(param, v, {**spec.params, param: v}) for v in spec.values]


@AUDIT_SURFACES.register("gradient", config=GradientSection, items={"settings": SettingSpec, "defenses": DefenseSpec})
class GradientSurface(Surface):
    """Shared updates of collaborative training (federated learning, LoRA, preference tuning)."""

    title = "Shared training updates (gradient inversion)"
    threat_model = (
        "An honest-but-curious server (or anyone who sees one client's update) receives the update a client "
        "computed on a batch of its private texts and knows the shared model's weights. It never sees the texts."
    )

    @staticmethod
    def preflight(section: GradientSection, options: AuditOptions) -> None:
        from leaklab.attacks.base import make_attack
        from leaklab.defenses import make_defense
        from leaklab.threat.settings import resolve_setting

        require_causal_lm(section.model, "gradient.model")
        with prefixed("gradient.attack"):
            make_attack(section.attack, dict(section.attack_options))
        if section.sweep_attack:
            with prefixed("gradient.sweep_attack"):
                make_attack(section.sweep_attack, dict(section.attack_options))
        for i, s in enumerate(section.setting_specs()):
            with prefixed(f"gradient.settings[{i}]"):
                resolve_setting(*s.resolved())
        for i, d in enumerate(section.defense_specs()):
            with prefixed(f"gradient.defenses[{i}]"):
                for _, _, params in _defense_points(d):
                    make_defense(d.defense, **params)

    # ------------------------------------------------------------------ plan
    def _attack_options(self, scale: float) -> tuple[dict[str, Any], list[str]]:
        opts = dict(self.section.attack_options)
        budget = opts.get("budget_s")
        if budget is not None and scale < 1:
            scaled = max(10.0, round(float(budget) * scale, 1))
            if scaled < float(budget):
                opts["budget_s"] = scaled
                return opts, [f"gradient: {self.section.attack} time limit per batch {budget} s → {scaled} s"]
        return opts, []

    def _estimate(self, opts: dict[str, Any]) -> float:
        from leaklab.models.registry import PACKAGED

        spec = PACKAGED.get(self.section.model)
        if spec is not None and spec.random_init:
            return min(float(opts.get("budget_s", 60)), 60.0) + 2.0
        return 2 * min(float(opts.get("budget_s", 60)), 60.0) + 60.0  # model loading, victim update, overshoot

    def plan(self, scale: float) -> Plan:
        sec, o = self.section, self.options
        opts, scaling = self._attack_options(scale)
        batches = scaled_count(sec.batches, scale, 1)
        if batches < sec.batches:
            scaling.append(f"gradient: private batches per setting {sec.batches} → {batches}")
        est = self._estimate(opts)
        common = {
            "model": sec.model,
            "attack": sec.attack,
            "attack_options": opts,
            "corpus": o.corpus,
            "min_tokens": o.min_tokens,
            "max_tokens": o.max_tokens,
        }
        steps = []
        specs = sec.setting_specs()
        for i, s in enumerate(specs):
            for b in range(self._shared_batches(i, batches), batches):
                spec = {**common, "setting": s.to_dict(), "seed": o.seed + b}
                steps.append(
                    Step(
                        f"attack-{i}-b{b}",
                        f"{s.label()}: batch {b + 1}/{batches}",
                        spec,
                        _runner(_attack_step, spec),
                        est,
                    )
                )
        if sec.defenses:
            base = specs[sec.sweep_setting]
            points = [("none", None, None, {})] + [
                (d.defense, p, v, params) for d in sec.defense_specs() for p, v, params in _defense_points(d)
            ]
            for j, (name, param, value, params) in enumerate(points):
                for b in range(sec.sweep_batches):
                    spec = {
                        **common,
                        "setting": base.to_dict(),
                        "seed": o.seed + b,
                        "defense": name,
                        "attack": sec.attack if name == "none" else sec.defended_attack,
                        "param": param,
                        "value": value,
                        "params": params,
                    }
                    label = f"sweep {name}{'' if value is None else f'={value:g}'}: batch {b + 1}/{sec.sweep_batches}"
                    steps.append(Step(f"sweep-{j}-b{b}", label, spec, _runner(_sweep_step, spec), est + 5))
        # the undefended sweep point first: it is also the swept setting's attack, and a surface's first step
        # always runs
        steps.sort(key=lambda st: not st.name.startswith("sweep-0-"))
        return Plan(steps, scaling)

    def _shared_batches(self, i: int, batches: int) -> int:
        """How many of setting ``i``'s first batches the sweep's undefended point attacks already (the same
        update on the same seeds): those are not attacked twice."""
        sec = self.section
        return min(sec.sweep_batches, batches) if sec.defenses and i == sec.sweep_setting else 0

    def _setting_records(self, i: int, steps: list[Step], results: dict[str, dict[str, Any]]) -> list[dict]:
        """Setting ``i``'s attacked batches: its own steps and, for the swept setting, the undefended sweep point's."""
        own = (f"attack-{i}-",) + (("sweep-0-",) if self._shared_batches(i, 1) else ())
        return [results[st.name] for st in steps if st.name.startswith(own) and st.name in results]

    # ------------------------------------------------------------------ summary
    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        sec, thr = self.section, self.options.leak_threshold
        specs = sec.setting_specs()
        rows, examples = [], []
        for i, s in enumerate(specs):
            recs = self._setting_records(i, steps, results)
            rows.append(_setting_row(s, recs))
            examples += [
                {"where": s.label(), "private": p["true_text"], "recovered": p["pred_text"], "score": p["rouge1"]}
                for r in recs[:1]
                for p in r.get("pairs", [])[:3]
            ]
        sweep = _sweep_rows(sec, steps, results, thr)
        best = _recommend(sweep)
        leaks = [r["rouge1"] for r in rows if r["rouge1"] is not None]
        worst = max(leaks) if leaks else None
        if worst is not None:
            where = rows[[r["rouge1"] for r in rows].index(worst)]["setting"]
            evidence = Evidence(risk_of(worst, 0.5, thr), "ROUGE-1", worst, f"{sec.attack} on {where}")
        elif rows and all(r["status"] == "no_signal" for r in rows):
            evidence = Evidence("low", "ROUGE-1", None, f"{sec.attack} found no signal in any setting")
        else:
            evidence = Evidence(
                "unknown", "ROUGE-1", None, "; ".join(sorted({x for r in rows for x in r["reasons"]})) or "no batch ran"
            )
        flags = _flags_text(specs)
        tables = [_settings_table(rows)]
        plots = []
        if sweep:
            tables.append(_sweep_table(sweep, best, thr))
            plots.append(_sweep_plot(sweep, best, thr, sec))
        notes = [
            f"Private batches are drawn from the private split of '{self.options.corpus}' "
            f"({self.options.min_tokens}–{self.options.max_tokens} tokens); utility is the validation loss on "
            f"{UTILITY_TEXTS} public texts after one server step (θ − η·g with η = {SERVER_LR:g} for a gradient, "
            "θ − Δ for a delta).",
            _adaptive_note(sec.defended_attack),
        ]
        recommendation = None
        if best is not None:
            reached = "no signal" if best["rouge1"] is None else f"{fmt(best['rouge1'])} ROUGE-1 (≤ {thr})"
            recommendation = (
                f"{best['defense']} {best['param'] or ''}={best['value']} brings {sec.defended_attack} to "
                f"{reached} at a utility cost of {best['cost']:+.2e} Δ loss"
            )
        elif any(r["defense"] == "none" and r["stopped"] for r in sweep):
            recommendation = f"none needed against {sec.attack}: the undefended update is already at ROUGE-1 ≤ {thr}"
        elif not any(r["defense"] != "none" for r in sweep):
            recommendation = "none: no defended sweep point ran (see the time budget section)" if sec.defenses else None
        elif sweep:
            recommendation = f"no swept defense brought {sec.defended_attack} to ROUGE-1 ≤ {thr}: sweep stronger values"
        return report_section(
            evidence,
            flags,
            tables=tables,
            examples=examples,
            plots=plots,
            notes=notes,
            recommendation=recommendation,
            data={"settings": rows, "sweep": sweep},
        )


def _adaptive_note(attack: str) -> str:
    """Whether the sweep credits a defense against an attacker who knows it."""
    if attack == "somp-adaptive":
        return (
            "The attacker knows each defense (somp-adaptive: it projects out known noise and completes top-k "
            "sparsified gradients before SOMP); a defense is credited against that attacker."
        )
    return (
        f"The attack ({attack}) is the same under every defense and ignores it: a defense that 'stops' it bounds "
        "this attack only. Set 'attack: somp-adaptive' to judge defenses against an attacker who knows them."
    )


def _runner(fn: Any, spec: dict[str, Any]) -> Any:
    return lambda: fn(spec)


def _attack_step(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting's update on one private batch, attacked and scored."""
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef
    from leaklab.threat.settings import sample_update

    s = SettingSpec.from_dict(spec["setting"])
    name, opts = s.resolved()
    obs, secret = sample_update(
        name,
        ModelRef(spec["model"]),
        spec["corpus"],
        s.batch_size,
        spec["seed"],
        spec["min_tokens"],
        spec["max_tokens"],
        s.flags(),
        **opts,
    )
    record = attack_batch(spec["attack"], obs, secret, seed=spec["seed"], options=spec["attack_options"])
    return record.to_dict()


def _sweep_step(spec: dict[str, Any]) -> dict[str, Any]:
    """One sweep point on one batch: the defended update, attacked and scored, and its utility."""
    import time

    from leaklab.defenses import defended_update, make_defense
    from leaklab.defenses.utility import utility
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef

    s = SettingSpec.from_dict(spec["setting"])
    name, opts = s.resolved()
    defs = [] if spec["defense"] == "none" else [make_defense(spec["defense"], **spec["params"])]
    t0 = time.perf_counter()
    obs, secret = defended_update(
        name,
        ModelRef(spec["model"]),
        spec["corpus"],
        s.batch_size,
        spec["seed"],
        defs,
        spec["min_tokens"],
        spec["max_tokens"],
        s.flags(),
        **opts,
    )
    record = attack_batch(
        spec["attack"],
        obs,
        secret,
        seed=spec["seed"],
        options=spec["attack_options"],
        victim_seconds=time.perf_counter() - t0,
    )
    util = utility(obs, spec["corpus"], UTILITY_TEXTS, spec["seed"], 2, spec["max_tokens"], SERVER_LR)
    eps = [r.get("epsilon") for r in obs.defenses if r.get("epsilon") is not None]
    return {**record.to_dict(), "utility": util, "epsilon": eps[0] if eps else None}


def _setting_row(s: SettingSpec, recs: list[dict[str, Any]]) -> dict[str, Any]:
    from leaklab.experiments.runner import summarise

    summary = summarise(recs) if recs else {"status": "could_not_run", "reasons": ["not run"], "batches": 0}
    return {
        "setting": s.label(),
        "batches": summary["batches"],
        "status": summary["status"],
        "outcomes": summary.get("outcomes", {}),
        "reasons": summary.get("reasons", []),
        "rouge1": summary.get("rouge1"),
        "rouge2": summary.get("rouge2"),
        "token_f1": summary.get("token_f1"),
        "bag_f1": summary.get("bag_f1"),
        "exact_rate": summary.get("exact_rate"),
        "attack_seconds": summary.get("attack_seconds"),
    }


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _sweep_rows(
    sec: GradientSection, steps: list[Step], results: dict[str, dict[str, Any]], thr: float
) -> list[dict[str, Any]]:
    """One row per sweep point (means over its batches) with its utility cost against the undefended point."""
    from leaklab.experiments.runner import outcome_summary

    groups: dict[str, list[tuple[Step, dict[str, Any]]]] = {}
    for st in steps:
        if st.name.startswith("sweep-") and st.name in results:
            groups.setdefault(st.name.rsplit("-b", 1)[0], []).append((st, results[st.name]))
    rows = []
    for items in groups.values():
        spec, recs = items[0][0].spec, [r for _, r in items]
        outcome = outcome_summary([r["status"] for r in recs], [r.get("reason") for r in recs])
        scored = [r["aggregate"] for r in recs if r.get("aggregate")]
        rows.append(
            {
                "defense": spec["defense"],
                "param": spec["param"],
                "value": spec["value"],
                "epsilon": recs[0].get("epsilon"),
                **outcome,
                "rouge1": _mean([s.get("rouge1") for s in scored]),
                "token_f1": _mean([s.get("token_f1") for s in scored]),
                "loss": _mean([r["utility"]["loss"] for r in recs]),
            }
        )
    base = next((r for r in rows if r["defense"] == "none"), None)
    for r in rows:
        r["cost"] = r["loss"] - base["loss"] if base and r["loss"] is not None and base["loss"] is not None else None
        r["stopped"] = (r["rouge1"] is not None and r["rouge1"] <= thr) or r["status"] == "no_signal"
    return rows


def _recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The defended point that stops the attack at the smallest utility cost (none when the undefended update
    already does)."""
    if any(r["defense"] == "none" and r["stopped"] for r in rows):
        return None
    ok = [r for r in rows if r["defense"] != "none" and r["stopped"] and r["cost"] is not None]
    return min(ok, key=lambda r: r["cost"]) if ok else None


def _flags_text(specs: list[SettingSpec]) -> list[str]:
    out = ["The server knows the model weights and the batch size (sample counts are part of the protocol)."]
    out.append("It does not know the texts' labels or lengths; dropout was off when the update was computed.")
    for s in specs:
        if s.learning_rate is not None:
            out.append(f"{s.label()}: the server knows the local learning rate and step count (it sets them).")
        if s.clients > 1:
            out.append(f"{s.label()}: the server sees only the aggregate of {s.clients} clients (secure aggregation).")
    return out


def _settings_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from leaklab.experiments.runner import outcome_text

    body = [
        [
            r["setting"],
            str(r["batches"]),
            outcome_text(r, "rouge1"),
            fmt(r["rouge2"]),
            fmt(r["token_f1"]),
            fmt(r["exact_rate"]),
            fmt(r["attack_seconds"]),
        ]
        for r in rows
    ]
    return {
        "title": "Attack per training setting",
        "columns": ["setting", "batches", "ROUGE-1", "ROUGE-2", "token F1", "exact", "attack s"],
        "rows": body,
    }


def _sweep_table(rows: list[dict[str, Any]], best: dict[str, Any] | None, thr: float) -> dict[str, Any]:
    from leaklab.experiments.runner import outcome_text

    body = []
    for r in rows:
        strength = "–" if r["value"] is None else f"{r['param']}={r['value']:g}"
        mark = "recommended" if r is best else ("stopped" if r["stopped"] and r["defense"] != "none" else "")
        body.append(
            [
                r["defense"],
                strength,
                fmt(r["epsilon"]),
                outcome_text(r, "rouge1"),
                fmt(r["token_f1"]),
                fmt(r["cost"]) if r["cost"] is None else f"{r['cost']:+.2e}",
                mark,
            ]
        )
    return {
        "title": f"Defense sweep (stopped: ROUGE-1 ≤ {thr} or no signal)",
        "columns": ["defense", "strength", "ε", "ROUGE-1", "token F1", "utility cost (Δ loss)", ""],
        "rows": body,
    }


def _sweep_plot(rows: list[dict[str, Any]], best: dict[str, Any] | None, thr: float, sec: GradientSection) -> dict:
    """ROUGE-1 against utility cost per defense; the threshold line and the recommended point marked."""
    fig, ax = new_figure()
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["defense"] for r in rows))
    for k, name in enumerate(names):
        pts = [r for r in rows if r["defense"] == name and r["cost"] is not None]
        colour = plt.get_cmap("tab10")(k)
        ys = [r["rouge1"] if r["rouge1"] is not None else np.nan for r in pts]
        ax.plot([r["cost"] for r in pts], ys, "o-", color=colour, label=name)
        for r, y in zip(pts, ys, strict=True):
            if r["value"] is not None:
                ax.annotate(f"{r['value']:g}", (r["cost"], 0.02 if np.isnan(y) else y), fontsize=7)
            if np.isnan(y):
                ax.plot([r["cost"]], [0.02], "x", color="black")
    ax.axhline(thr, color="grey", ls=":", label=f"threshold {thr}")
    if best is not None:
        ax.plot(
            [best["cost"]],
            [best["rouge1"] or 0.0],
            "*",
            ms=18,
            color="gold",
            mec="black",
            label="recommended",
            zorder=5,
        )
    ax.set_xlabel("utility cost: Δ validation loss vs undefended (lower is better)")
    ax.set_ylabel(f"{sec.defended_attack} ROUGE-1")
    ax.set_ylim(0, 1.02)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useOffset=False)
    ax.legend(fontsize=7)
    ax.set_title("privacy–utility of the defenses (× = no recovered batch)")
    return embedded_plot(fig, "Privacy–utility: gradient defenses")
