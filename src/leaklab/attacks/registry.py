"""The gradient-attack registry: light to import (no model code), so CLI help texts can name the attacks.

Built-ins are declared as name → module and imported on first lookup; third-party attacks register through the
Python entry point group ``leaklab.attacks``.
"""

from __future__ import annotations

from leaklab.core import Config, Entry, NoOptions, Registry

#: the built-in gradient attacks and the modules that register them (imported on first lookup)
BUILTINS = {
    "somp": "leaklab.attacks.gradient.somp",
    "dager": "leaklab.attacks.gradient.dager",
    "tokenset": "leaklab.attacks.gradient.tokenset",
    "tokenset-residual": "leaklab.attacks.gradient.tokenleak",
    "tag": "leaklab.attacks.gradient.optim",
    "lamp": "leaklab.attacks.gradient.optim",
    "somp-adaptive": "leaklab.attacks.gradient.adaptive",
    "utr": "leaklab.attacks.gradient.utr",
}
GRADIENT_ATTACKS: Registry[type] = Registry("attack", builtins=BUILTINS, entry_points="leaklab.attacks")


def register_gradient_attack(
    name: str,
    config: type[Config] = NoOptions,
    settings: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    help: str = "",
):
    """Class decorator: register a gradient attack (built as ``cls(config)``) for the settings it supports
    (None: every setting, through the setting's view)."""
    return GRADIENT_ATTACKS.register(name, config=config, settings=settings, aliases=aliases, help=help)


def attack_entry(name: str) -> Entry:
    return GRADIENT_ATTACKS.get(name)
