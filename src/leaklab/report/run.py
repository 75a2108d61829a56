"""Run folders: config.json (seed, model, corpus, threat flags, package versions), items.json (per-item
results) and aggregate.json, each written atomically.

A run is written into a hidden temporary sibling (``.NAME.tmp-*``) and renamed into place only when it
completes, so a folder at the run's path always holds a finished run. An interrupted or failed run that wrote
results keeps them in ``NAME.incomplete/`` with a ``status.json`` saying why; one that wrote nothing leaves
nothing. An existing run is replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from leaklab.errors import LeaklabError
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
INCOMPLETE_SUFFIX = ".incomplete"
STATUS_FILE = "status.json"
_SCAFFOLD = {"config.json"}  # files that alone are not results worth keeping


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
    """The folder a run writes into: the temporary one while it runs, its final path once complete."""

    path: Path

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / "config.json", {**config, "environment": environment()})

    def write_items(self, items: list[dict[str, Any]]) -> None:
        atomic_write_json(self.path / "items.json", items)

    def write_aggregate(self, aggregate: dict[str, Any]) -> None:
        atomic_write_json(self.path / "aggregate.json", aggregate)


def run_path(out: str | Path | None, label: str) -> Path:
    """``out`` if given, else runs/<UTC time>-<label>."""
    if out is not None:
        return Path(out)
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{label}"


def check_output(path: str | Path, overwrite: bool = False, what: str = "run folder") -> Path:
    """Refuse an output path that already holds something unless ``overwrite`` (an empty folder is free for
    a run folder); a run folder cannot replace a file, nor a record (``what`` other than a run folder) a
    folder."""
    p = Path(path)
    folder = what == "run folder"
    if folder and p.is_dir() and not any(p.iterdir()):
        return p
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise LeaklabError(f"{what} '{p}' already exists; pass --overwrite to replace it, or choose another --out")
        if p.is_dir() != folder:
            kind = "a folder" if p.is_dir() else "a file"
            raise LeaklabError(f"'{p}' is {kind}, not a {what}; remove it or choose another --out")
    return p


@contextmanager
def run_folder(out: str | Path | None, label: str, overwrite: bool = False) -> Iterator[RunDir]:
    """A :class:`RunDir` in a temporary sibling of the run's path, renamed into place when the block
    completes (replacing an old run only with ``overwrite``; an earlier ``<path>.incomplete/`` is removed). On an
    error or Ctrl-C, results already written move to ``<path>.incomplete/`` with ``status.json``; a folder
    holding only the config is removed."""
    target = check_output(run_path(out, label), overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    run = RunDir(work)
    try:
        yield run
        check_output(target, overwrite)  # another process may have written it meanwhile
        _replace_dir(work, target)
        shutil.rmtree(_incomplete(target), ignore_errors=True)  # an earlier attempt's leftovers are superseded
    except BaseException as exc:
        _keep_incomplete(work, target, exc)
        raise
    run.path = target


def _replace_dir(src: Path, target: Path) -> None:
    """Move ``src`` to ``target``; an old ``target`` is renamed aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "run")
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _incomplete(target: Path) -> Path:
    return target.with_name(target.name + INCOMPLETE_SUFFIX)


def _keep_incomplete(work: Path, target: Path, exc: BaseException) -> None:
    if not work.exists():
        return
    if {p.name for p in work.iterdir()} <= _SCAFFOLD:
        shutil.rmtree(work, ignore_errors=True)
        return
    interrupted = isinstance(exc, KeyboardInterrupt)
    atomic_write_json(
        work / STATUS_FILE,
        {
            "status": "incomplete" if interrupted else "failed",
            "reason": "interrupted" if interrupted else f"{type(exc).__name__}: {exc}",
            "run": str(target),
        },
    )
    incomplete = _incomplete(target)
    if incomplete.is_dir():
        shutil.rmtree(incomplete, ignore_errors=True)
    os.replace(work, incomplete)
