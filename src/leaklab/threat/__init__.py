"""Victim side: produces (Observation, Secret) pairs and stores updates."""

from leaklab.threat.fedsgd import client_update, fedsgd_update, gradient
from leaklab.threat.observation import Observation, Secret, ThreatFlags, require_observation
from leaklab.threat.store import load_secret, load_update, save_update

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
