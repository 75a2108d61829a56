"""The core every front-end builds on: typed options (:mod:`config`) and registries (:mod:`registry`)."""

from leaklab.core.config import Config, NoOptions, option, parse_pairs, parse_spec
from leaklab.core.registry import Entry, Registry

__all__ = ["Config", "Entry", "NoOptions", "Registry", "option", "parse_pairs", "parse_spec"]
