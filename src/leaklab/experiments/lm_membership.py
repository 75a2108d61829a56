"""The LM membership loop: a fine-tuned folder and its Secret → every attack's scores on members vs
non-members (AUC, TPR at 1 % / 0.1 % FPR with bootstrap intervals), canary exposure and extraction, and
utility (perplexity on the held-out non-members). Only this loop holds both the attacker's view and the Secret.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from leaklab.attacks.membership.access import LMAccess
from leaklab.attacks.membership.extraction import canary_exposure, extract_canaries
from leaklab.attacks.membership.run import run_membership_attack
from leaklab.metrics.membership import membership_report, roc_points
from leaklab.threat.finetune import FinetuneSecret

DEFAULT_ATTACKS = ("loss", "zlib", "min-k", "min-k++", "reference", "rmia")


def perplexity(access: LMAccess, texts: Sequence[str], base: bool = False) -> float:
    """exp(total NLL / total predicted tokens) of ``texts`` under the fine-tune (or the granted base model)."""
    stats = access.stats(access.base if base and access.base is not None else access.target, texts)
    nll = sum(-float(s.logp.sum()) for s in stats)
    return float(np.exp(nll / sum(len(s.logp) for s in stats)))


def evaluate_membership(
    access: LMAccess,
    secret: FinetuneSecret,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    options: dict[str, Any] | None = None,
    rounds: int = 1000,
    exposure_samples: int = 1000,
    beams: Sequence[int] = (1, 5),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every attack on members (label 1) vs non-members (label 0), canaries, and utility."""
    rows = attack_rows(access, secret, attacks, options, rounds, progress)
    if progress:
        progress("canaries")
    canaries = {
        "exposure": canary_exposure(access.target, secret.canaries, secret.canary_digits, exposure_samples),
        "extraction": extract_canaries(access.target, secret.canaries, beams),
    }
    return {
        "access": access.record(),
        "members": len(secret.members),
        "non_members": len(secret.non_members),
        "shift": secret.shift,
        "attacks": rows,
        "canaries": canaries,
        "canary_summary": summarise_canaries(canaries, beams),
        "utility": {
            "heldout_perplexity": perplexity(access, secret.non_members),
            "base_heldout_perplexity": perplexity(access, secret.non_members, base=True) if access.base else None,
        },
    }


def attack_rows(
    access: LMAccess,
    secret: FinetuneSecret,
    attacks: Sequence[str],
    options: dict[str, Any] | None = None,
    rounds: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per attack on members (label 1) vs non-members (label 0): its outcome and, when it produced
    scores, AUC / TPR at 1 % and 0.1 % FPR with bootstrap intervals and the ROC curve."""
    texts = list(secret.members) + list(secret.non_members)
    labels = np.array([1] * len(secret.members) + [0] * len(secret.non_members))
    rows = []
    for name in attacks:
        if progress:
            progress(f"attack {name}")
        out = run_membership_attack(access, name, texts, (options or {}).get(name))
        row: dict[str, Any] = {
            "attack": name,
            "status": out.status,
            "reason": out.reason,
            "needs": list(out.needs),
            "options": out.options,
            "seconds": out.seconds,
        }
        if out.ok:
            assert out.scores is not None
            row["metrics"] = membership_report(out.scores, labels, rounds)
            fpr, tpr = roc_points(out.scores, labels)
            row["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        rows.append(row)
    return rows


def summarise_canaries(canaries: dict[str, list[dict[str, Any]]], beams: Sequence[int]) -> list[dict[str, Any]]:
    """Per k: mean exposure and the share of canaries extracted exactly at each beam width."""
    out = []
    for k in sorted({c["repeats"] for c in canaries["exposure"]}):
        exp = [c for c in canaries["exposure"] if c["repeats"] == k]
        ext = [c for c in canaries["extraction"] if c["repeats"] == k]
        row: dict[str, Any] = {
            "k": k,
            "canaries": len(exp),
            "mean_exposure": float(np.mean([c["exposure"] for c in exp])),
            "max_exposure": exp[0]["max_exposure"],
            "at_bound": sum(c["at_bound"] for c in exp),
            "mean_exposure_fitted": _mean_or_none([c.get("exposure_fitted") for c in exp]),
        }
        for b in beams:
            row[f"extracted_beam{b}"] = float(np.mean([c[f"recovered_beam{b}"] for c in ext]))
        out.append(row)
    return out


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))
