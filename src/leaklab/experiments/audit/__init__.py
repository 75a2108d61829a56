"""``leaklab audit``: one command that audits a system's leakage surfaces and writes one self-contained report."""

from leaklab.experiments.audit.config import AuditConfig, AuditOptions, load_config, parse_config, preflight
from leaklab.experiments.audit.run import run_audit
from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, PLANNED, Surface

__all__ = [
    "AUDIT_SURFACES",
    "PLANNED",
    "AuditConfig",
    "AuditOptions",
    "Surface",
    "load_config",
    "parse_config",
    "preflight",
    "run_audit",
]
