"""The defense registry: name → defense class (which is its own options config), with the side it acts on.

The built-in defense modules import only the contract (:mod:`leaklab.defenses.base`); this module imports
them and registers each, so nothing imports back into a module that imports it.
"""

from __future__ import annotations

from typing import Any

from leaklab.core import Registry, parse_pairs, parse_spec
from leaklab.defenses.base import Defense, DefenseConfig
from leaklab.errors import LeaklabError


def _builtins() -> None:
    from leaklab.defenses.dpsgd import DpSgd
    from leaklab.defenses.update import Aggregate, Clip, FrozenEmbeddings, Gaussian, Laplace, TopK

    for cls in (Clip, Gaussian, Laplace, TopK, FrozenEmbeddings, Aggregate, DpSgd):
        register_defense(cls)


DEFENSES: Registry[type[DefenseConfig]] = Registry("defense", builtins=_builtins)


def register_defense(cls: type[DefenseConfig]) -> type[DefenseConfig]:
    """Register a defense class under its ``name``; the entry's ``extra["side"]`` is where it acts."""
    doc = " ".join((cls.__doc__ or "").split())
    return DEFENSES.register(cls.name, cls, config=cls, help=doc, side=cls.side)


def defense_names() -> list[str]:
    return DEFENSES.names()


def make_defense(name: str, **params: Any) -> Defense:
    """Build a defense by name from typed values or CLI strings (coerced by each option's type); unknown
    names and unknown or malformed parameters are refused with the valid ones."""
    return DEFENSES.get(name).options(params)


def parse_defense(spec: str, params: list[str] | None = None) -> Defense:
    """``NAME`` or ``NAME:k=v,k=v``, plus ``k=v`` strings (e.g. ``dpsgd``, ["clip=1", "epsilon=8"])."""
    name, inline = parse_spec(spec, "defense parameter")
    extra = parse_pairs(params, "defense parameter")
    twice = sorted(inline.keys() & extra.keys())
    if twice:
        raise LeaklabError(f"defense parameter '{twice[0]}' is given twice")
    return make_defense(name, **inline, **extra)
