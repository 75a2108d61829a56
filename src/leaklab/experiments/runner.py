"""The one loop: Observation → attack → score → :class:`RunRecord`.

Every gradient front-end (``gradient attack``, ``gradient bench``, ``gradient sweep``, the settings benchmark,
the Python API) goes through :func:`attack_batch`; only here are an Observation and its Secret held together.
Every embedding front-end (``embed attack``, ``embed bench``, ``embed defend-eval``) goes through
:func:`run_embedding` or :func:`attack_embedding`: the victim side (:mod:`.scenario`) builds the access the attack
is granted, the attack returns a prediction, and only here is it scored against the private texts. An attack that
could not run, or found no signal, yields a record with that status and its reason and no scores:
:func:`summarise` averages recovered batches only and counts the others, so a failure never reads as 0.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from leaklab.attacks.base import GradientAttack, Recovery, make_attack, outcome_of, run_attack
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, AttackReport, Scenario
from leaklab.experiments.scenario import Case, build_case, score_case
from leaklab.metrics import score_bag, score_batch
from leaklab.models import load_model
from leaklab.models.device import current_device, device_record, reset_peak_memory
from leaklab.threat.observation import Observation, Secret

#: text metrics (matched ROUGE and token scores) and bag metrics (a token set scored as a set)
TEXT_METRICS = ("rouge1", "rouge2", "rougeL", "token_f1", "exact_rate")
BAG_METRICS = ("bag_precision", "bag_recall", "bag_f1", "bag_distinct_recall")
STATUS_LABEL = {"recovered": "recovered", "could_not_run": "could not run", "no_signal": "no signal"}
EMBEDDING = "embedding"  # the setting of embedding-attack records


@dataclass
class RunRecord:
    """One attacked batch: what ran on what, its outcome, and (when recovered and a secret is known) scores."""

    attack: str
    options: dict[str, Any]
    setting: str
    status: str
    reason: str | None
    kind: str
    recovered: list[str]
    attack_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    observation: dict[str, Any] = field(default_factory=dict)
    aggregate: dict[str, float] | None = None  # the scores; None when not recovered or not scored
    pairs: list[dict[str, Any]] = field(default_factory=list)
    batch: int | None = None
    seed: int | None = None
    victim_seconds: float = 0.0
    tokens: int | None = None
    device: dict[str, Any] = field(default_factory=dict)  # where it ran: device, name, peak memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(obs: Observation, secret: Secret, rec: Recovery) -> dict[str, Any]:
    """Scores of a recovered batch: texts after one-to-one matching (ROUGE, token P/R/F1, exact) on the model
    tokenizer's ids; a bag of tokens as a set against the batch's token multiset. Refuses unrecovered batches."""
    if not rec.ok:
        raise ValueError(f"nothing to score: the attack's outcome is '{rec.status}' ({rec.reason})")
    true_ids = [list(t) for t in secret.token_ids]
    if rec.kind == "bag":
        return {"aggregate": score_bag(rec.token_ids[0] if rec.token_ids else [], true_ids), "pairs": []}
    loaded = load_model(obs.model)
    pred_ids = rec.token_ids if rec.token_ids is not None else [loaded.encode(t) for t in rec.texts]
    scored = score_batch(rec.texts, list(secret.texts), pred_ids, true_ids)
    return {"aggregate": scored.aggregate(), "pairs": [p.to_dict() for p in scored.pairs]}


def attack_batch(
    attack: GradientAttack | str,
    obs: Observation,
    secret: Secret | None = None,
    *,
    batch: int | None = None,
    seed: int | None = None,
    victim_seconds: float = 0.0,
    options: Any = None,
) -> RunRecord:
    """Run ``attack`` (an attack, or a registered name with ``options``) on ``obs``; score it against
    ``secret`` when given and the attack recovered something."""
    atk = make_attack(attack, options) if isinstance(attack, str) else attack
    reset_peak_memory(current_device())
    rec = run_attack(atk, obs)
    config = getattr(atk, "config", None)
    record = RunRecord(
        attack=getattr(atk, "name", type(atk).__name__),
        options=config.to_dict() if config is not None else {},
        setting=obs.setting,
        status=rec.status,
        reason=rec.reason,
        kind=rec.kind,
        recovered=list(rec.texts),
        attack_seconds=rec.seconds,
        info=rec.info,
        observation=obs.record(),
        batch=batch,
        seed=seed,
        victim_seconds=victim_seconds,
        tokens=sum(secret.lengths) if secret is not None else None,
        device=device_record(),
    )
    if secret is not None and rec.ok:
        scored = score(obs, secret, rec)
        record.aggregate, record.pairs = scored["aggregate"], scored["pairs"]
    return record


def run_embedding(name: str, scenario: Scenario, options: Any = None) -> RunRecord:
    """Evaluate embedding attack ``name`` on ``scenario`` with ``options`` (a dict, ``key=value`` strings or the
    attack's config), timed. Bad options and a scenario whose encoder or corpus cannot supply its targets raise
    (the user's input); an attack that then fails on the scenario (or whose victim side cannot be built, e.g.
    white-box access to a remote encoder) yields "could_not_run" (or "no_signal") with the reason and no
    metrics. The record's observation is the scenario with the access grants and the attack's notes
    (``flags``); ``aggregate`` holds the metrics, ``info`` the attack's info and the attacker's ``usage``,
    ``pairs`` a few (true, recovered) texts; ``recovered`` stays empty (the records keep examples, not every
    text)."""
    entry = EMBED_ATTACKS.get(name)
    cfg = entry.options(options)
    scenario.check()
    reset_peak_memory(current_device())
    start = time.perf_counter()
    outcome = outcome_of(
        f"{name} on '{scenario.encoder}'", lambda: attack_embedding(name, build_case(entry, scenario, cfg), cfg)
    )
    record = embedding_record(name, cfg.to_dict(), scenario.to_dict(), time.perf_counter() - start, *outcome)
    record.device = device_record()
    return record


def attack_embedding(name: str, case: Case, cfg: Any) -> AttackReport:
    """Run attack ``name`` on what ``case`` grants (never its secret), then score its prediction against the
    case's secret. Raises what the attack raises (:func:`outcome_of` turns it into an outcome)."""
    entry = EMBED_ATTACKS.get(name)
    pred = entry.impl(case.access, case.public, cfg)
    usage = case.access.usage()  # read before scoring: the scorer's own embeddings are no attacker queries
    metrics, pairs = score_case(entry, case, pred, cfg)
    flags = case.access.grants() | case.notes | pred.notes
    return AttackReport(name, case.scenario, metrics, usage, flags, pairs, pred.info)


def embedding_record(
    name: str,
    options: dict[str, Any],
    scenario: dict[str, Any],
    seconds: float,
    status: str,
    reason: str | None,
    report: AttackReport | None,
) -> RunRecord:
    """The run record of an embedding attack's outcome, with what its module reported when it ran: metrics,
    the attacker's flags (in the observation) and usage (in info), and example pairs."""
    record = RunRecord(
        attack=name,
        options=options,
        setting=EMBEDDING,
        status=status,
        reason=reason,
        kind="metrics",
        recovered=[],
        attack_seconds=round(seconds, 3),
        observation=scenario,
        seed=scenario.get("seed"),
    )
    if report is not None:
        record.observation = {**report.scenario, "flags": report.flags}
        record.aggregate = report.metrics
        record.info = {**report.info, "usage": report.usage}
        record.pairs = report.examples
    return record


def record_outcome(record: dict[str, Any]) -> str:
    """One record's (a :meth:`RunRecord.to_dict` row) outcome: "recovered", or "n/a: could not run (reason)"."""
    if record["status"] == "recovered":
        return STATUS_LABEL["recovered"]
    return outcome_text(outcome_summary([record["status"]], [record.get("reason")]))


def outcome_summary(statuses: list[str], reasons: list[str | None]) -> dict[str, Any]:
    """Counts per status, the overall status (recovered if any batch was) and the distinct reasons."""
    counts = Counter(statuses)
    overall = "recovered" if counts["recovered"] else ("no_signal" if counts["no_signal"] else "could_not_run")
    return {
        "status": overall if statuses else "could_not_run",
        "outcomes": {s: counts[s] for s in STATUS_LABEL if counts[s]},
        "reasons": sorted({r for r in reasons if r}),
    }


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std of each metric over the recovered, scored batches (None where there are none), the outcome
    counts and reasons, and mean seconds. Items are :meth:`RunRecord.to_dict` rows."""
    out: dict[str, Any] = {"batches": len(items)}
    out.update(outcome_summary([it["status"] for it in items], [it.get("reason") for it in items]))
    scored = [it["aggregate"] for it in items if it.get("aggregate")]
    for key in (*TEXT_METRICS, *BAG_METRICS):
        vals = [s[key] for s in scored if s.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
        out[f"{key}_std"] = float(np.std(vals)) if vals else None
    out["scored_batches"] = len(scored)
    out["attack_seconds"] = float(np.mean([it["attack_seconds"] for it in items])) if items else 0.0
    out["victim_seconds"] = float(np.mean([it.get("victim_seconds", 0.0) for it in items])) if items else 0.0
    peaks = [it["device"]["peak_memory_mb"] for it in items if (it.get("device") or {}).get("peak_memory_mb")]
    out["peak_memory_mb"] = max(peaks) if peaks else None
    devices = sorted({it["device"]["device"] for it in items if it.get("device")})
    out["device"] = ", ".join(devices) if devices else None
    return out


def outcome_text(summary: dict[str, Any], metric: str = "rouge1") -> str:
    """``"0.812"`` for a recovered metric; ``"n/a: could not run (reason)"`` otherwise."""
    value = summary.get(metric)
    if value is not None:
        return f"{value:.3f}"
    status = summary.get("status", "could_not_run")
    if status == "recovered":
        return "n/a"
    reasons = "; ".join(summary.get("reasons", []))
    return f"n/a: {STATUS_LABEL[status]}" + (f" ({reasons})" if reasons else "")
