"""The threat-setting registry: light to import (no model code), so an Observation can check its setting's name
and CLI help texts can list the settings without loading the victims' code.

Each setting is declared here by name and registered (with its options and update function) by
:mod:`leaklab.threat.settings`, imported on first lookup.
"""

from __future__ import annotations

from leaklab.core import Registry

#: the built-in threat settings and the module that registers them
BUILTINS = {name: "leaklab.threat.settings" for name in ("fedsgd", "fedavg", "lora", "dpo", "reward", "secagg")}
THREAT_SETTINGS: Registry = Registry("threat setting", builtins=BUILTINS)
