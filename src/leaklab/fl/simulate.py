"""Run a federation on Flower's simulation engine (Ray backend) with the auditor in the server process.

:func:`simulate` returns the run's summary (records, utility, seconds) and writes the run folder: one leaklab
update file per captured update (secrets apart), ``records.json`` and :mod:`leaklab.fl.report`'s files.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leaklab.fl.audit import Auditor
from leaklab.fl.config import FlRun
from leaklab.fl.report import summarise_run, write_run_folder

#: Ray's shared-memory object store (default: 30 % of the machine's memory); each round's messages pass through it,
#: and larger objects than it holds fall back to disk
OBJECT_STORE_BYTES = 1 << 30
#: glibc returns a freed block to the OS at once only if it was mmap-ed: from this size on, blocks are (the default
#: threshold adapts upwards to 32 MiB, and the heap keeps freed per-layer tensors of a model round after round)
MMAP_THRESHOLD_BYTES = 1 << 17


def backend_config(num_cpus: int, client_cpus: float, object_store_bytes: int = OBJECT_STORE_BYTES) -> dict[str, Any]:
    """Ray with ``num_cpus`` CPUs, each client actor reserving ``client_cpus`` (so at most num_cpus/client_cpus
    run at once), an object store of ``object_store_bytes``, no GPU, no dashboard."""
    return {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": num_cpus,
            "object_store_memory": object_store_bytes,
            "include_dashboard": False,
            "logging_level": "error",
        },
    }


def return_freed_memory() -> None:
    """Make glibc hand freed tensor memory back to the OS in this process (``mallopt``; for a process that runs a
    federation, such as the CLI's: the setting lasts for the process); a no-op where the C library is not glibc.
    :func:`simulate` does the same for the Ray workers it starts, through their environment."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return


@contextmanager
def worker_environment() -> Iterator[None]:
    """The environment the Ray workers inherit while Ray starts: glibc's mmap threshold fixed (see above)."""
    key, previous = "MALLOC_MMAP_THRESHOLD_", os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ[key] = previous or str(MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)


def simulate(
    run: FlRun,
    num_cpus: int = 2,
    client_cpus: float = 1.0,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The federation of ``run`` on Flower's Ray simulation engine. The auditor captures every update; it attacks
    them after the federation (``run.attack_after``: Ray is shut down and Flower's copies of the replies are
    gone first) or in-line."""
    import ray
    from flwr.simulation import run_simulation

    from leaklab.fl.client import client_app
    from leaklab.fl.server import make_server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    auditor = Auditor(run, run.out or None, on_event, defer=run.attack_after)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a terminated run still shuts Ray down
    try:
        with worker_environment():
            run_simulation(
                make_server_app(run, auditor), client_app, run.clients, "ray", backend_config(num_cpus, client_cpus)
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ray.is_initialized():  # Flower shuts Ray down; make sure of it
            ray.shutdown()
    gc.collect()
    auditor.attack_stored()
    summary = summarise_run(run, auditor, time.perf_counter() - start)
    if run.out:
        write_run_folder(Path(run.out), summary)
    auditor.close()
    return summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
