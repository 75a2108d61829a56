"""Defenses: composable wrappers on what a client shares (never forks of the victim code).

Server-side / post-hoc defenses transform an Observation (``apply``); client-side ones (DP-SGD, frozen
embeddings) hook into the client's local training; ``aggregate`` changes the protocol (secure aggregation
over more clients). :func:`defended_update` runs a setting with a list of defenses and records each one
(name, parameters, derived values such as ε) in ``Observation.meta["defenses"]``. Each defense is a frozen
options config registered in :data:`DEFENSES` (``leaklab gradient defenses`` lists them).
"""

from leaklab.defenses.base import Defense, DefenseConfig
from leaklab.defenses.pipeline import apply_defenses, defended_update
from leaklab.defenses.registry import DEFENSES, defense_names, make_defense, parse_defense, register_defense

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseConfig",
    "apply_defenses",
    "defended_update",
    "defense_names",
    "make_defense",
    "parse_defense",
    "register_defense",
]
