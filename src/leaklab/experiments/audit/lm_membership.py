"""Audit surface ``lm-membership``: does a fine-tuned causal LM give away which texts it was trained on, and
does it reproduce canaries (secret-format strings) planted in its training data?

The model under audit is either the user's fine-tune (a folder or hub name) with its member and non-member
texts (two files, or the Secret ``leaklab lm finetune`` wrote beside the folder), or a fine-tune the audit makes
itself of a small member set drawn from the private split of the audit's corpus (``finetune``, on the packaged
default model, kept in the audit's output folder so a resumed audit does not train again). The battery is one
step: every configured membership attack (:mod:`leaklab.attacks.membership`) on members vs non-members through
:func:`leaklab.experiments.lm_membership.evaluate_membership` (AUC and TPR at 1 % / 0.1 % FPR with bootstrap
intervals), canary exposure and extraction where canaries are planted, and held-out perplexity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.experiments.audit.common import (
    best_evidence,
    embedded_plot,
    fmt,
    new_figure,
    prefixed,
    report_section,
    require_mapping,
    risk_of,
    scaled_count,
)
from leaklab.experiments.audit.config import AuditOptions, require_causal_lm
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, Evidence, Plan, Step, Surface

DEFAULT_ATTACKS = ("loss", "zlib", "min-k", "min-k++", "reference")
FINETUNE_DEFAULTS = {"members": 32, "method": "lora", "epochs": 3, "batch_size": 8}


@dataclass(frozen=True)
class LmMembershipSection(Config):
    """Section ``lm-membership``: a fine-tuned causal LM (yours, or one the audit fine-tunes) and its texts."""

    model: str | None = option(None, "your fine-tuned causal LM (folder or hub name); none: the audit fine-tunes one")
    base: str | None = option(None, "the model it was fine-tuned from, granted to the attacker (reference attack)")
    members: str | None = option(None, "file of texts the model was trained on (.txt/.csv/.jsonl)")
    non_members: str | None = option(None, "file of texts of the same kind it was not trained on")
    finetune: Mapping[str, Any] = option(
        lambda: {},
        "the audit's own fine-tune when model is none (leaklab lm finetune options: model, members, epochs, "
        "method, canary_repeats, ...); members are drawn from the private split of the audit's corpus",
    )
    grant_base: bool = option(True, "the audit's own fine-tune: the attacker holds its base model")
    attacks: tuple[str, ...] = option(DEFAULT_ATTACKS, "membership attacks (leaklab lm attacks)")
    attack_options: Mapping[str, Any] = option(lambda: {}, "attack name -> its options")
    public: bool = option(False, "grant public-split texts of the corpus (needed by rmia)")
    exposure_samples: int = option(200, "sampled secrets per canary prefix when estimating exposure")
    bootstrap: int = option(200, "bootstrap resamples of each AUC / TPR interval")

    def __post_init__(self) -> None:
        self.require(positive=("exposure_samples", "bootstrap"))
        require_mapping(self.finetune, "finetune", "option names")
        require_mapping(self.attack_options, "attack_options", "attack names")
        if not self.attacks:
            raise LeaklabError("attacks must name at least one membership attack")
        if self.model is None and (self.members or self.non_members or self.base):
            raise LeaklabError("members, non_members and base describe your model: give model too")
        if self.model is not None and self.finetune:
            raise LeaklabError("finetune is for the audit's own fine-tune: leave it out when model is given")
        if bool(self.members) != bool(self.non_members):
            raise LeaklabError("give both members and non_members files (or neither, for a leaklab lm finetune folder)")

    def finetune_config(self, options: AuditOptions, members: int | None = None) -> Any:
        """The audit's own fine-tune: members from the audit corpus's private split at the audit's seed and lengths."""
        from leaklab.threat.finetune import FinetuneConfig

        base = {"corpus": options.corpus, "seed": options.seed, "max_tokens": options.max_tokens}
        data = {**FINETUNE_DEFAULTS, **base, **self.finetune}
        if members is not None:
            data["members"] = members
        return FinetuneConfig.from_dict(data, "lm-membership.finetune")


@AUDIT_SURFACES.register("lm-membership", config=LmMembershipSection)
class LmMembershipSurface(Surface):
    """A fine-tuned causal LM: membership inference and canary extraction."""

    title = "Fine-tuned LM: membership and canaries"
    threat_model = (
        "The attacker can score any text with the fine-tuned model (its token probabilities) and prompt it. It "
        "wants to tell whether a given private text was in the fine-tuning data, and to extract secrets "
        "(canaries) that were. It never sees the training set."
    )

    @staticmethod
    def preflight(section: LmMembershipSection, options: AuditOptions) -> None:
        from leaklab.attacks.membership.registry import MEMBERSHIP_ATTACKS

        if section.model is None:
            cfg = section.finetune_config(options)
            require_causal_lm(cfg.model, "lm-membership.finetune.model")
        else:
            require_causal_lm(section.model, "lm-membership.model")
            if section.members:
                for field, path in (("members", section.members), ("non_members", section.non_members)):
                    _read_texts(path, f"lm-membership.{field}")
            else:
                from leaklab.threat.finetune import secret_path

                if not secret_path(section.model).is_file():
                    raise LeaklabError(
                        "lm-membership: give members and non_members files (the model is no leaklab lm finetune "
                        "folder with its Secret beside it)"
                    )
        if section.base:
            require_causal_lm(section.base, "lm-membership.base")
        unknown = sorted(set(section.attack_options) - set(section.attacks))
        if unknown:
            raise LeaklabError(f"lm-membership.attack_options: {', '.join(unknown)} is not among attacks")
        for name in section.attacks:
            with prefixed(f"lm-membership.attacks ({name})"):
                MEMBERSHIP_ATTACKS.get(name).options(section.attack_options.get(name))

    def plan(self, scale: float) -> Plan:
        sec, o = self.section, self.options
        scaling: list[str] = []
        common = {
            "attacks": list(sec.attacks),
            "attack_options": dict(sec.attack_options),
            "public": o.corpus if sec.public else None,
            "exposure_samples": sec.exposure_samples,
            "bootstrap": sec.bootstrap,
        }
        if sec.model is None:
            full = sec.finetune_config(o)
            cfg = sec.finetune_config(o, scaled_count(full.members, scale, 8))
            if cfg.members < full.members:
                scaling.append(f"lm-membership: fine-tune members {full.members} → {cfg.members}")
            spec = {**common, "finetune": cfg.to_dict(), "base": cfg.model if sec.grant_base else None}
            texts = (cfg.members + cfg.n_non_members) * (2 if sec.grant_base else 1)
            estimate = _pass_s(cfg.model) * (cfg.epochs * _train_texts(cfg) * 3 + texts) + 20
            label = f"fine-tune {cfg.model} on {cfg.members} members ({cfg.method}, {cfg.epochs} epochs) and attack"
        else:
            members = _read_texts(sec.members, "members") if sec.members else None
            non = _read_texts(sec.non_members, "non_members") if sec.non_members else None
            spec = {**common, "model": sec.model, "base": sec.base, "members": members, "non_members": non}
            texts = (len(members) + len(non)) if members and non else 200
            estimate = _pass_s(sec.model) * texts * (2 if sec.base else 1) + 20
            label = f"membership attacks on {sec.model}"
        workdir = self.workdir
        return Plan([Step("membership", label, spec, lambda: _membership_step(spec, workdir), estimate)], scaling)

    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        res = results.get("membership")
        if res is None:
            unknown = Evidence("unknown", "membership AUC", None, "the step did not run (see the time budget section)")
            return report_section(unknown, self._flags(None))
        attacks = [_attack_row(r) for r in res["attacks"]]
        canaries = res.get("canary_summary") or []
        evidences = [
            Evidence(
                risk_of(r["auc"], 0.8, 0.6), "membership AUC", r["auc"], f"{r['attack']}, TPR@1%FPR {fmt(r['tpr1'])}"
            )
            for r in attacks
            if r["auc"] is not None
        ]
        share = _extracted_share(res)
        if share is not None:
            evidences.append(
                Evidence("high" if share > 0 else "low", "canaries extracted", share, "prompted with their prefix")
            )
        fallback = Evidence("unknown", "membership AUC", None, "no attack could run")
        evidence = best_evidence(sorted(evidences, key=lambda e: -(e.value or 0)), fallback)
        tables = [_attack_table(attacks, res)]
        if canaries:
            tables.append(_canary_table(canaries))
        examples = [
            {
                "where": f"canary ×{c['repeats']}",
                "private": c["secret"],
                "recovered": c.get("beam1", ""),
                "score": 1.0 if c.get("recovered_beam1") else 0.0,
            }
            for c in (res.get("canaries") or {}).get("extraction", [])[:4]
        ]
        plots = [_roc_plot(res)] if any(r.get("roc") for r in res["attacks"]) else []
        util = res.get("utility") or {}
        notes = [
            f"{res['members']} members vs {res['non_members']} non-members; intervals: 95 % bootstrap. Held-out "
            f"perplexity {fmt(util.get('heldout_perplexity'), 2)} (base model: "
            f"{fmt(util.get('base_heldout_perplexity'), 2)})."
        ]
        if "finetune" in res:
            ft = res["finetune"]
            notes.append(
                f"The audit fine-tuned {ft['model']} itself ({ft['method']}, {ft['epochs']} epochs, lr "
                f"{ft['learning_rate']:g}) on members drawn from the private split of '{self.options.corpus}'."
            )
        recommendation = None
        if evidence.risk in ("high", "medium"):
            recommendation = (
                "fine-tune with DP-SGD (leaklab lm finetune --epsilon), fewer epochs, and deduplicate secrets out of "
                "the training data"
            )
        return report_section(
            evidence,
            self._flags(res),
            tables=tables,
            examples=examples,
            plots=plots,
            notes=notes,
            recommendation=recommendation,
            data={"attacks": attacks},
        )

    def _flags(self, res: dict[str, Any] | None) -> list[str]:
        grants = ((res or {}).get("access") or {}).get("grants") or {}
        out = ["The attacker computes the fine-tuned model's token log-probabilities for texts of its choice."]
        out.append(
            "It holds the base model the fine-tune started from (flag: base model)."
            if grants.get("base_model")
            else "It does not hold the base model (attacks that need it cannot run)."
        )
        if grants.get("public_data"):
            out.append("It holds public texts of the same kind (flag: public data) to train shadow models.")
        if res and res.get("shift"):
            p = (res["shift"].get("length") or {}).get("p_value")
            if p is not None:
                out.append(f"Members and non-members have the same length distribution (KS test p = {p:.2f}).")
        return out


def _read_texts(path: str | None, what: str) -> list[str]:
    from leaklab.corpora import load_corpus

    if not path or not Path(path).expanduser().is_file():
        raise LeaklabError(f"{what} file '{path}' does not exist")
    texts = list(load_corpus(str(Path(path).expanduser())).texts)
    if not texts:
        raise LeaklabError(f"{what} file '{path}' holds no text")
    return texts


def _pass_s(model: str) -> float:
    """Seconds of one forward+backward text pass on 2 CPU cores: packaged random-init models are tiny."""
    from leaklab.models.registry import PACKAGED

    spec = PACKAGED.get(model)
    return 0.01 if spec is not None and spec.random_init else 0.9


def _train_texts(cfg: Any) -> int:
    return cfg.members + sum(cfg.repeats) * cfg.canaries_per_repeat


def _finetune_folder(cfg: Any, workdir: Path) -> Path:
    """The audit's own fine-tune of ``cfg`` under ``workdir`` (trained once per configuration)."""
    from leaklab.threat.finetune import finetune

    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    folder = workdir / f"finetune-{key}"
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        finetune(cfg, folder)
    return folder


def _membership_step(spec: dict[str, Any], workdir: Path | None) -> dict[str, Any]:
    from leaklab.attacks.membership import LMAccess
    from leaklab.experiments.lm_membership import evaluate_membership
    from leaklab.io import cache_dir
    from leaklab.models.causal import load_causal_lm
    from leaklab.threat.finetune import FinetuneConfig, FinetuneSecret, load_secret

    workdir = workdir or cache_dir() / "audit"
    extra: dict[str, Any] = {}
    if spec.get("finetune"):
        cfg = FinetuneConfig.from_dict(spec["finetune"])
        model = str(_finetune_folder(cfg, workdir))
        secret = load_secret(model)
        extra["finetune"] = {**cfg.to_dict(), "learning_rate": cfg.learning_rate}
    else:
        model = spec["model"]
        members, non = spec.get("members"), spec.get("non_members")
        secret = FinetuneSecret(tuple(members), tuple(non)) if members else load_secret(model)
    public = None
    if spec.get("public"):
        from leaklab.corpora import load_corpus
        from leaklab.corpora.sampling import split_of

        public = tuple(t for t in load_corpus(spec["public"]).texts if split_of(t) == "public")
    base = load_causal_lm(spec["base"]) if spec.get("base") else None
    access = LMAccess(load_causal_lm(model), base, public, workdir / "shadows")
    result = evaluate_membership(
        access,
        secret,
        spec["attacks"],
        spec["attack_options"],
        rounds=spec["bootstrap"],
        exposure_samples=spec["exposure_samples"],
    )
    return {**result, **extra}


def _metric(r: dict[str, Any], key: str, part: str = "value") -> float | None:
    m = (r.get("metrics") or {}).get(key)
    return None if m is None else m.get(part)


def _attack_row(r: dict[str, Any]) -> dict[str, Any]:
    from leaklab.experiments.runner import record_outcome

    return {
        "attack": r["attack"],
        "status": r["status"],
        "outcome": "scored" if r["status"] == "recovered" else record_outcome(r),
        "needs": r.get("needs") or [],
        "auc": _metric(r, "auc"),
        "auc_low": _metric(r, "auc", "low"),
        "auc_high": _metric(r, "auc", "high"),
        "tpr1": _metric(r, "tpr@0.01"),
        "tpr01": _metric(r, "tpr@0.001"),
        "seconds": r.get("seconds"),
    }


def _extracted_share(res: dict[str, Any]) -> float | None:
    """Share of canaries any beam width reproduced; None without canaries."""
    rows = (res.get("canaries") or {}).get("extraction") or []
    if not rows:
        return None
    hits = [any(v for k, v in c.items() if k.startswith("recovered_beam")) for c in rows]
    return sum(hits) / len(hits)


def _attack_table(rows: list[dict[str, Any]], res: dict[str, Any]) -> dict[str, Any]:
    body = []
    for r in rows:
        auc = "–" if r["auc"] is None else f"{r['auc']:.3f} [{r['auc_low']:.2f}, {r['auc_high']:.2f}]"
        body.append(
            [
                r["attack"],
                r["outcome"],
                auc,
                fmt(r["tpr1"]),
                fmt(r["tpr01"]),
                ", ".join(r["needs"]) or "–",
                fmt(r["seconds"], 1),
            ]
        )
    return {
        "title": f"Membership attacks: {res['members']} members vs {res['non_members']} non-members",
        "columns": ["attack", "outcome", "AUC [95% CI]", "TPR@1%FPR", "TPR@0.1%FPR", "needs", "seconds"],
        "rows": body,
    }


def _canary_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    beams = sorted(k for k in rows[0] if k.startswith("extracted_beam"))
    return {
        "title": "Canaries: exposure (bits) and extraction by prompting with their prefix",
        "columns": [
            "inserted ×k",
            "canaries",
            "mean exposure",
            "max exposure",
            *[b.replace("extracted_", "extracted ") for b in beams],
        ],
        "rows": [
            [str(r["k"]), str(r["canaries"]), fmt(r["mean_exposure"], 1), fmt(r["max_exposure"], 1)]
            + [f"{r[b]:.0%}" for b in beams]
            for r in rows
        ],
    }


def _roc_plot(res: dict[str, Any]) -> dict[str, str]:
    """ROC curve of each attack that ran (log–log axes: the low-FPR region is what matters)."""
    fig, ax = new_figure(5.5, 4)
    for r in res["attacks"]:
        if r.get("roc"):
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{r['attack']} (AUC {_metric(r, 'auc'):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("membership ROC per attack")
    ax.legend(fontsize=7)
    return embedded_plot(fig, "Membership ROC")
