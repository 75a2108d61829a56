"""Run an audit: check the config, plan every configured surface within the time budget, run the steps
(each finished step cached in the output folder, so an interrupted audit resumes), and write
``report.json`` and the self-contained ``report.html``."""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from leaklab.experiments.audit.config import AuditConfig, preflight
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, PLANNED, Plan, Step, Surface, load_planned
from leaklab.io import atomic_write_json, atomic_write_text
from leaklab.progress import step_progress

OVERRUN = 1.25  # a surface starts no further step once it has spent its share of the budget times this
STEP_LIMIT_FACTOR = 4.0  # a step may always run this many times its estimate ...
MIN_STEP_S = 60.0  # ... and at least this long
STATE = "audit-state.json"


def build_surfaces(config: AuditConfig, out: Path | None = None) -> dict[str, Surface]:
    """Each configured surface; with ``out``, each keeps its files under ``out/work/<surface>``."""
    return {
        name: AUDIT_SURFACES.get(name).impl(section, config.options, out / "work" / name if out else None)
        for name, section in config.sections.items()
    }


def not_assessed(config: AuditConfig) -> list[dict[str, str]]:
    """Every known surface that this audit does not assess, with the reason."""
    missing = load_planned()
    out = []
    for name in AUDIT_SURFACES.names():
        if name not in config.sections:
            out.append(
                {
                    "surface": name,
                    "title": AUDIT_SURFACES.get(name).impl.title,
                    "reason": f"not configured (add a '{name}:' section to the audit config)",
                }
            )
    for name, reason in missing.items():
        given = " (the config has a section for it)" if name in config.unavailable else ""
        out.append(
            {"surface": name, "title": PLANNED[name][0], "reason": reason + given, "would_assess": PLANNED[name][3]}
        )
    return out


def choose_scale(plans: dict[str, Plan], budget_s: float) -> float:
    """1 when the estimated battery fits the budget, else budget / estimate."""
    estimate = sum(s.estimate_s for p in plans.values() for s in p.steps)
    return 1.0 if estimate <= budget_s else budget_s / estimate


def plan_all(surfaces: dict[str, Surface], budget_s: float, out: Path, config_key: str) -> tuple[float, dict]:
    """The scale (kept from an interrupted run of the same config, so cached steps match) and the plans."""
    state_path = out / STATE
    scale = None
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("config") == config_key:
            scale = state["scale"]
    if scale is None:
        scale = choose_scale({n: s.plan(1.0) for n, s in surfaces.items()}, budget_s)
        atomic_write_json(state_path, {"config": config_key, "scale": scale})
    return scale, {n: s.plan(scale) for n, s in surfaces.items()}


def shares(plans: dict[str, Plan], budget_s: float) -> dict[str, float]:
    """Each surface's part of the budget, in proportion to its estimated battery."""
    est = {n: sum(s.estimate_s for s in p.steps) for n, p in plans.items()}
    total = sum(est.values()) or 1.0
    return {n: budget_s * e / total for n, e in est.items()}


class StepTimeout(Exception):
    """A step ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in the block after ``seconds`` (a SIGALRM timer; no limit off the main
    thread or where the platform has no such timer)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise StepTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def step_limit(step: Step, share_left: float) -> float:
    """A step may run for the rest of its surface's share, and never less than a few times its estimate."""
    return max(STEP_LIMIT_FACTOR * step.estimate_s, share_left, MIN_STEP_S)


class Pace:
    """How much longer than estimated the steps of this run take (the machine's speed and load now): the
    ratio of the measured to the estimated seconds of the steps run so far, at least 1."""

    def __init__(self) -> None:
        self.estimated = self.measured = 0.0

    def add(self, step: Step, seconds: float) -> None:
        self.estimated += step.estimate_s
        self.measured += seconds

    @property
    def factor(self) -> float:
        return max(1.0, self.measured / self.estimated) if self.estimated else 1.0

    def predict(self, step: Step) -> float:
        return step.estimate_s * self.factor


def run_steps(
    plans: dict[str, Plan],
    out: Path,
    budget_s: float,
    console: Console,
    cached_only: bool = False,
    timings: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, dict]], list[dict[str, str]], int]:
    """Run (or load from the cache) every step. Each surface's first step always runs; a later one starts only
    while the surface has spent less than its share of the budget (times :data:`OVERRUN`) and its estimate at
    the run's measured :class:`Pace` still fits that share, else it is listed as not run; a step that runs past
    :func:`step_limit` is stopped and listed likewise (with ``cached_only``, every step not in the cache is
    listed as not run). ``timings`` receives each run step's seconds and estimate. Returns the results per
    surface, the steps not run and the number loaded from the cache."""
    results: dict[str, dict[str, dict]] = {n: {} for n in plans}
    skipped, cached = [], 0
    share = shares(plans, budget_s)
    pace = Pace()
    total = sum(len(p.steps) for p in plans.values())
    with step_progress(console) as bar:
        task = bar.add_task("audit", total=total)
        for name, plan in plans.items():
            spent = 0.0
            for i, step in enumerate(plan.steps):
                path = out / "steps" / name / f"{step.key}.json"
                bar.update(task, description=f"{name}: {step.label}")
                if path.exists():
                    results[name][step.name] = json.loads(path.read_text())
                    cached += 1
                elif cached_only:
                    skipped.append({"surface": name, "step": step.label, "reason": "not in the cache (--cached-only)"})
                elif i and spent > share[name] * OVERRUN:
                    skipped.append({"surface": name, "step": step.label, "reason": "time budget spent"})
                elif i and spent + pace.predict(step) > share[name] * OVERRUN:
                    reason = (
                        f"would overrun the time budget (about {pace.predict(step):.0f} s at the measured pace, "
                        f"{pace.factor:.1f}× the estimates)"
                    )
                    skipped.append({"surface": name, "step": step.label, "reason": reason})
                else:
                    limit = step_limit(step, share[name] * OVERRUN - spent)
                    t0 = time.perf_counter()
                    try:
                        with time_limit(limit):
                            result = step.run()
                    except StepTimeout:
                        reason = f"stopped at its time limit ({limit:.0f} s)"
                        skipped.append({"surface": name, "step": step.label, "reason": reason})
                    else:
                        atomic_write_json(path, result)
                        results[name][step.name] = json.loads(path.read_text())
                    took = time.perf_counter() - t0
                    spent += took
                    pace.add(step, took)
                    if timings is not None:
                        timings.append(
                            {
                                "surface": name,
                                "step": step.label,
                                "seconds": round(took, 1),
                                "estimate_s": step.estimate_s,
                            }
                        )
                bar.advance(task)
    return results, skipped, cached


def environment_record(started: float) -> dict[str, Any]:
    import torch

    from leaklab import __version__
    from leaklab.report.run import environment

    device = f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    return {
        "leaklab": __version__,
        **environment(),
        "device": device,
        "machine": platform.machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }


def run_audit(
    config: AuditConfig,
    out: str | Path,
    *,
    redact: bool = False,
    cached_only: bool = False,
    command: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """The whole audit; returns the report (also written to ``out/report.json`` and ``out/report.html``).
    ``cached_only`` writes the report of the steps already in ``out``'s cache (an interrupted audit) and runs
    nothing."""
    from leaklab.report.html import redact_report, render_html

    console = console or Console(stderr=True)
    preflight(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wall0, t0 = time.time(), time.perf_counter()
    budget_s = config.options.time_budget_min * 60
    surfaces = build_surfaces(config, out)
    config_key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    scale, plans = plan_all(surfaces, budget_s, out, config_key)
    timings: list[dict[str, Any]] = []
    results, skipped, cached = run_steps(plans, out, budget_s, console, cached_only, timings)
    sections = []
    for name, surface in surfaces.items():
        body = surface.summarise(results[name], plans[name].steps)
        ran = len(results[name])
        sections.append(
            {
                "surface": name,
                "title": surface.title,
                "threat_model": surface.threat_model,
                **body,
                "evidence": body["evidence"].to_dict(),
                "steps": {"planned": len(plans[name].steps), "ran": ran},
            }
        )
    duration = time.perf_counter() - t0
    report = {
        "title": "leaklab audit",
        "summary": [
            {
                "surface": s["surface"],
                "title": s["title"],
                **s["evidence"],
                "threat_model": s["threat_model"],
                "flags": s["flags"],
                "recommendation": s["recommendation"],
            }
            for s in sections
        ],
        "surfaces": sections,
        "not_assessed": not_assessed(config),
        "scaling": {
            "budget_min": config.options.time_budget_min,
            "scale": round(scale, 3),
            "changes": [c for p in plans.values() for c in p.scaling],
            "not_run": skipped,
        },
        "reproducibility": {
            "command": command or " ".join(["leaklab", *sys.argv[1:]]),
            "config": config.to_dict(),
            "config_file": config.path,
            "seed": config.options.seed,
            "environment": environment_record(wall0),
            "duration_s": round(duration, 1),
            "steps_from_cache": cached,
            "step_seconds": timings,
            "redacted": redact,
            "cached_only": cached_only,
        },
    }
    if redact:
        report = redact_report(report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))
    return report
