"""Audit surfaces: each way private text can leak from the system under audit, as a registered plug-in.

A surface (a :class:`Surface` subclass registered in :data:`AUDIT_SURFACES` with the Config of its section of
the audit file) checks its section before any work (:meth:`Surface.preflight`), plans its battery as cacheable
:class:`Step` s scaled to the time budget (:meth:`Surface.plan`), and turns the steps' results into its report
section (:meth:`Surface.summarise`): a risk level with the evidence number, the threat model in plain words,
tables, side-by-side examples and privacy–utility plots. Third-party or later surfaces register through the
``leaklab.audit_surfaces`` entry point group; the surfaces in :data:`PLANNED` that no installed module provides
are listed in the report as not assessed, with the reason. A later surface is a module of this package
named in :data:`PLANNED` whose import registers it.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from leaklab.core import Config, Registry

if TYPE_CHECKING:
    from leaklab.experiments.audit.config import AuditOptions

RISK_LEVELS = ("high", "medium", "low", "unknown")


@dataclass(frozen=True)
class Step:
    """One cacheable unit of an audit: ``run()`` returns a JSON-serialisable result. The cache key holds a
    hash of ``spec`` (everything the result depends on), so a changed config never reuses a stale result."""

    name: str
    label: str
    spec: dict[str, Any]
    run: Callable[[], dict[str, Any]]
    estimate_s: float

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"


@dataclass
class Plan:
    """A surface's steps at a scale, and what the scaling changed (stated in the report)."""

    steps: list[Step]
    scaling: list[str] = field(default_factory=list)


@dataclass
class Evidence:
    """The executive summary's line for a surface: its risk and the number that decided it."""

    risk: str
    metric: str
    value: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"risk": self.risk, "metric": self.metric, "value": self.value, "detail": self.detail}


class Surface(ABC):
    """One audit surface. Subclasses set ``title`` and ``threat_model`` and implement the three methods."""

    title: ClassVar[str] = ""
    threat_model: ClassVar[str] = ""

    def __init__(self, section: Config, options: AuditOptions, workdir: Path | None = None):
        self.section = section
        self.options = options
        self.workdir = workdir  # the surface's folder in the audit's output (files its steps keep), if any

    @staticmethod
    @abstractmethod
    def preflight(section: Config, options: AuditOptions) -> None:
        """Check what the section names (models, encoders, endpoints, attack options) without running anything."""

    @abstractmethod
    def plan(self, scale: float) -> Plan:
        """The battery's steps with batches/samples scaled by ``scale`` (1 = as configured)."""

    @abstractmethod
    def summarise(self, results: dict[str, dict[str, Any]], steps: list[Step]) -> dict[str, Any]:
        """The report section from the finished steps' results (keyed by step name; a step missing from
        ``results`` did not run): ``evidence`` (an :class:`Evidence`), ``flags``, ``tables``, ``examples``,
        ``plots`` and ``notes``."""


AUDIT_SURFACES: Registry[type[Surface]] = Registry(
    "audit surface",
    {
        "gradient": "leaklab.experiments.audit.gradient",
        "embedding": "leaklab.experiments.audit.embedding",
        "api-defenses": "leaklab.experiments.audit.apidefense",
    },
    entry_points="leaklab.audit_surfaces",
)

#: surfaces the audit knows of, each provided by a module of this package once written: name -> (title, the
#: surface's module (importing it registers the surface), the leaklab module it builds on, what it assesses)
PLANNED: dict[str, tuple[str, str, str, str]] = {
    "flower": (
        "Flower federated training",
        "leaklab.experiments.audit.flower",
        "leaklab.fl",
        "gradient attacks on the updates a Flower server receives from real ClientApps",
    ),
    "lm-membership": (
        "Fine-tuned LM: membership and canaries",
        "leaklab.experiments.audit.lm_membership",
        "leaklab.attacks.membership",
        "membership inference (loss, zlib, min-k, reference) and canary extraction on a fine-tune and its base",
    ),
    "kb-secrets": (
        "Knowledge base: secret extraction",
        "leaklab.experiments.audit.kb_secrets",
        "leaklab.attacks.embedding.kbsecrets",
        "extraction of secrets (keys, numbers, names) from a search endpoint's hidden documents",
    ),
}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def load_planned() -> dict[str, str]:
    """Import the module of each planned surface that exists (importing registers it); the reason for each
    surface that is not available."""
    import importlib

    missing = {}
    for name, (_, module, base, _) in PLANNED.items():
        if name in AUDIT_SURFACES:
            continue
        if not _importable(module):
            missing[name] = (
                f"{base} is installed but its audit surface ({module}) is not written yet"
                if _importable(base)
                else f"not available in this leaklab version ({base} is not installed)"
            )
            continue
        importlib.import_module(module)
        if name not in AUDIT_SURFACES:
            missing[name] = f"module {module} did not register the '{name}' surface"
    return missing
