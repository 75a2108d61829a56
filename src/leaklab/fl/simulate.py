"""Run a federation on Flower's simulation engine (Ray backend) with the auditor in the server process.

:func:`simulate` returns the run's summary (records, utility, seconds) and writes the run folder: one leaklab
update file per captured update (secrets apart), ``records.json`` and :mod:`leaklab.fl.report`'s files.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leaklab.fl.audit import Auditor
from leaklab.fl.config import FlRun
from leaklab.fl.report import summarise_run, write_run_folder


def backend_config(num_cpus: int, client_cpus: float) -> dict[str, Any]:
    """Ray with ``num_cpus`` CPUs, each client actor reserving ``client_cpus`` (so at most num_cpus/client_cpus
    run at once), no GPU, no dashboard."""
    return {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "include_dashboard": False, "logging_level": "error"},
    }


def simulate(
    run: FlRun,
    num_cpus: int = 2,
    client_cpus: float = 1.0,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The federation of ``run`` on Flower's Ray simulation engine; the auditor captures and attacks in-line."""
    import ray
    from flwr.simulation import run_simulation

    from leaklab.fl.client import client_app
    from leaklab.fl.server import make_server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    auditor = Auditor(run, run.out or None, on_event)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated run still shuts Ray down
    try:
        run_simulation(
            make_server_app(run, auditor), client_app, run.clients, "ray", backend_config(num_cpus, client_cpus)
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ray.is_initialized():  # Flower shuts Ray down; make sure of it
            ray.shutdown()
    summary = summarise_run(run, auditor, time.perf_counter() - start)
    if run.out:
        write_run_folder(Path(run.out), summary)
    auditor.close()
    return summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
