"""Where models and attack tensors live: one resolver for ``--device`` / ``LEAKLAB_DEVICE``, the device a run
uses, what a run records about it, and how much memory a chunked computation may take.

Placement contract: a model is built on the CPU and moved to the current device by
:func:`leaklab.models.load_model`; victims compute on the model's device and share their update as CPU
tensors (what travels to a server); attacks move the blocks they compute with to the model's device.
"""

from __future__ import annotations

import os
import platform
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from leaklab.errors import LeaklabError

ENV = "LEAKLAB_DEVICE"
CHOICES = "auto, cpu, cuda, cuda:N"
#: share of the free device memory one chunked computation may take (the rest: the model, caches, others)
MEMORY_SHARE = 0.25

_CHOSEN: dict[str, torch.device | None] = {"device": None}  # set by set_device (the CLI's --device)


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; None reads ``LEAKLAB_DEVICE``
    (default auto). A CUDA device on a machine without one is a user error with one line."""
    if isinstance(spec, torch.device):
        return spec
    text = (spec or os.environ.get(ENV) or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        return _cuda(text)
    raise LeaklabError(f"unknown device '{text}'; valid: {CHOICES}")


def _cuda(text: str) -> torch.device:
    index_text = text.partition(":")[2] or "0"
    if not index_text.isdigit():
        raise LeaklabError(f"unknown device '{text}'; valid: {CHOICES}")
    if not torch.cuda.is_available():
        raise LeaklabError(
            f"device '{text}' asked for, but CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    index, count = int(index_text), torch.cuda.device_count()
    if index >= count:
        raise LeaklabError(f"device '{text}' asked for, but this machine has {count} CUDA device(s) (0..{count - 1})")
    return torch.device("cuda", index)


def set_device(spec: str | torch.device | None) -> torch.device:
    """Make ``spec`` (resolved) the device models are placed on from now on; returns it."""
    _CHOSEN["device"] = resolve_device(spec)
    return _CHOSEN["device"]


def current_device() -> torch.device:
    """The device set by :func:`set_device`, else ``LEAKLAB_DEVICE`` / auto."""
    chosen = _CHOSEN["device"]
    return chosen if chosen is not None else resolve_device(None)


@contextmanager
def use_device(spec: str | torch.device | None) -> Iterator[torch.device]:
    """Place models on ``spec`` inside the block, then restore the previous choice."""
    before = _CHOSEN["device"]
    try:
        yield set_device(spec)
    finally:
        _CHOSEN["device"] = before


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return platform.processor() or platform.machine() or "cpu"
    return device.type


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory: CUDA bytes allocated since :func:`reset_peak_memory`; on the CPU the process's peak
    resident set (whole process lifetime, so it bounds a run's use from above)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if device.type == "cpu":
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    return None


def device_record(device: torch.device | None = None) -> dict[str, Any]:
    """What a run records about where it ran: device, its name, peak memory and what that peak measures."""
    device = device or current_device()
    kind = {"cuda": "cuda max allocated", "cpu": "process peak RSS"}.get(device.type, "n/a")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": kind,
    }


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors: CUDA's free bytes, or the machine's MemAvailable on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def chunk_rows(bytes_per_row: int, device: torch.device, most: int | None = None, share: float = MEMORY_SHARE) -> int:
    """How many rows of ``bytes_per_row`` bytes one chunk may hold: ``share`` of the device's free memory,
    at least 1 and at most ``most``."""
    rows = max(1, int(share * free_memory_bytes(device)) // max(1, bytes_per_row))
    return min(rows, most) if most is not None else rows
