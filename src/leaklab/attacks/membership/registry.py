"""Registry of the LM membership attacks: light to import, so CLI help texts can name them.

Each entry is ``score(access, texts, config) -> scores`` (higher = more likely a member) with its typed options
and ``needs``: the grants beyond the fine-tuned model it requires ("base", "public").
"""

from __future__ import annotations

from leaklab.core import Registry

#: the built-in attacks and the module that registers each
BUILTINS = {
    "loss": "leaklab.attacks.membership.scores",
    "zlib": "leaklab.attacks.membership.scores",
    "min-k": "leaklab.attacks.membership.scores",
    "min-k++": "leaklab.attacks.membership.scores",
    "reference": "leaklab.attacks.membership.scores",
    "rmia": "leaklab.attacks.membership.shadow",
}
MEMBERSHIP_ATTACKS: Registry = Registry(
    "membership attack", builtins=BUILTINS, entry_points="leaklab.membership_attacks"
)
