"""Victim side: produces (Observation, Secret) pairs and stores updates.

The names below load their modules on first use, so light modules of this package (the setting registry in
:mod:`leaklab.threat.settings`) import without the model code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leaklab.threat.fedsgd import fedsgd_update, gradient
    from leaklab.threat.observation import Observation, Secret, ThreatFlags, require_observation
    from leaklab.threat.settings import client_update
    from leaklab.threat.store import load_secret, load_update, save_update

_HOME = {
    "Observation": "observation",
    "Secret": "observation",
    "ThreatFlags": "observation",
    "require_observation": "observation",
    "client_update": "settings",
    "fedsgd_update": "fedsgd",
    "gradient": "fedsgd",
    "load_secret": "store",
    "load_update": "store",
    "save_update": "store",
}

__all__ = [
    "Observation",
    "Secret",
    "ThreatFlags",
    "client_update",
    "fedsgd_update",
    "gradient",
    "load_secret",
    "load_update",
    "require_observation",
    "save_update",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'leaklab.threat' has no attribute '{name}'")
    return getattr(import_module(f"leaklab.threat.{_HOME[name]}"), name)
