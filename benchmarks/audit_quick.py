"""Run examples/audit-quick.yaml end to end and keep its report, a screenshot of the report's first screen
in headless Chromium, and the wall time, under benchmarks/results/audit/.

    HF_HUB_OFFLINE=1 python benchmarks/audit_quick.py [--config examples/audit-quick.yaml] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "audit"
TARGET_S = 15 * 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/audit-quick.yaml")
    ap.add_argument("--work", default="audit-quick-run", help="the audit's output folder (step cache included)")
    args = ap.parse_args()
    cmd = ["leaklab", "audit", "--config", args.config, "--out", args.work]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    subprocess.run([sys.executable, "-m", "leaklab.cli", *cmd[1:]], check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, load1 = usage.ru_utime + usage.ru_stime, os.getloadavg()[0]

    from leaklab.report.browser import check_page

    RESULTS.mkdir(parents=True, exist_ok=True)
    work = ROOT / args.work
    for name in ("report.html", "report.json"):
        shutil.copy(work / name, RESULTS / name)
    seen = check_page(RESULTS / "report.html", RESULTS / "report-first-screen.png")
    report = json.loads((RESULTS / "report.json").read_text())
    write_readme(report, wall, cpu, (load0, load1), " ".join(cmd), seen)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_readme(report: dict, wall: float, cpu: float, load: tuple[float, float], cmd: str, seen) -> None:
    rows = "\n".join(
        f"| {s['title']} | {s['risk']} | {s['metric']} = {_num(s['value'])} | {s['detail']} | "
        f"{s['recommendation'] or '–'} |"
        for s in report["summary"]
    )
    missing = "\n".join(f"- {n['title']}: {n['reason']}" for n in report["not_assessed"]) or "- none"
    scaling = "\n".join(f"- {c}" for c in report["scaling"]["changes"]) or "- none"
    not_run = "\n".join(f"- {n['surface']}: {n['step']} ({n['reason']})" for n in report["scaling"]["not_run"])
    steps = "\n".join(
        f"| {t['surface']} | {t['step']} | {t['seconds']:.0f} | {t['estimate_s']:.0f} |"
        for t in report["reproducibility"].get("step_seconds", [])
    )
    verdict = "**reached**" if wall <= TARGET_S else f"**missed** (measured {wall / 60:.1f} min)"
    env = report["reproducibility"]["environment"]
    requests = len(seen.network_requests((RESULTS / "report.html").resolve().as_uri()))
    text = f"""# `leaklab audit` on the packaged defaults (examples/audit-quick.yaml)

Rerun: `HF_HUB_OFFLINE=1 python benchmarks/audit_quick.py` (runs `{cmd}`, then opens the report in headless
Chromium and screenshots its first screen).

- Report: [report.html](report.html) (self-contained: open it in any browser, print it), [report.json](report.json)
- First screen: ![first screen](report-first-screen.png)
- **Wall time: {wall:.0f} s** ({wall / 60:.1f} min; target ≤ 15 min: {verdict}) on {env["device"]}; the
  audit's own duration {report["reproducibility"]["duration_s"]:g} s, budget
  {report["scaling"]["budget_min"]:g} min, scale {report["scaling"]["scale"]:g}. CPU time of the audit process
  {cpu:.0f} s; 1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end (the machine is shared).
- In Chromium: {len(seen.console_errors)} console error(s), {requests} network request(s), sections
  {", ".join(seen.sections)}, surfaces {", ".join(seen.surfaces)}.

## Summary

| surface | risk | evidence | where | recommended mitigation |
|---|---|---|---|---|
{rows}

## Steps run (seconds measured vs the battery's estimate)

| surface | step | seconds | estimate |
|---|---|---|---|
{steps}

## Scaling to the time budget

{scaling}
{("Steps not run:" + chr(10) + not_run) if not_run else ""}

## Not assessed

{missing}
"""
    (RESULTS / "README.md").write_text(text)


if __name__ == "__main__":
    main()
