"""Defenses: composable wrappers on what a client shares (never forks of the victim code).

Server-side / post-hoc defenses transform an Observation (``apply``); client-side ones (DP-SGD, frozen
embeddings) hook into the client's local training; ``aggregate`` changes the protocol (secure aggregation
over more clients). :func:`defended_update` runs a setting with a list of defenses and records each one
(name, parameters, derived values such as ε) in ``Observation.meta["defenses"]``.
"""

from leaklab.defenses.base import DEFENSES, Defense, defense_names, make_defense, parse_defense
from leaklab.defenses.pipeline import apply_defenses, defended_update

__all__ = [
    "DEFENSES",
    "Defense",
    "apply_defenses",
    "defended_update",
    "defense_names",
    "make_defense",
    "parse_defense",
]
