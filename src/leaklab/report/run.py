"""A run folder holds config.json (seed, model, corpus, threat flags, package versions), items.json
(per-item results) and aggregate.json, each written atomically."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from leaklab.io import atomic_write_json

_PACKAGES = (
    "leaklab",
    "torch",
    "transformers",
    "numpy",
    "scipy",
    "rouge-score",
    "safetensors",
    "peft",
    "opacus",
    "flwr",
    "sentence-transformers",
    "fastapi",
)


def environment() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    from leaklab.models.device import current_device, device_name

    device = current_device()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "device_name": device_name(device),
    }


@dataclass
class RunDir:
    path: Path

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / "config.json", {**config, "environment": environment()})

    def write_items(self, items: list[dict[str, Any]]) -> None:
        atomic_write_json(self.path / "items.json", items)

    def write_aggregate(self, aggregate: dict[str, Any]) -> None:
        atomic_write_json(self.path / "aggregate.json", aggregate)


def new_run_dir(out: str | Path | None, label: str) -> RunDir:
    """``out`` if given (created), else runs/<UTC time>-<label>/ ."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out = Path("runs") / f"{stamp}-{label}"
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return RunDir(path)
