"""Federated learning on Flower: leaklab's ClientApp/ServerApp and AuditStrategy, which attacks what a Flower
server receives (see :mod:`leaklab.fl.audit`).

``from leaklab.fl import AuditStrategy, Auditor, FlRun`` loads Flower; nothing else in leaklab imports it.
"""

from __future__ import annotations

from leaklab.fl.audit import Auditor, AuditStrategy
from leaklab.fl.config import FL_DEFENSES, FlRun

__all__ = ["FL_DEFENSES", "AuditStrategy", "Auditor", "FlRun"]
