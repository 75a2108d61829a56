"""Helpers the audit surfaces share: config items and their errors, scaling, evidence, report cells, tables
and figures."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.experiments.audit.surfaces import RISK_LEVELS, Evidence


def spec_of(cls: type[Config], data: Any, where: str) -> Any:
    """``data`` (a mapping from the config file) as a ``cls`` config; ``where`` names it in errors."""
    if not isinstance(data, dict):
        raise LeaklabError(f"{where} must be a mapping of keys to values")
    return cls.from_dict(data, where)


def specs_of(cls: type[Config], items: Any, where: str) -> list[Any]:
    """:func:`spec_of` of each item of a config list, named ``where[i]`` in errors."""
    return [spec_of(cls, d, f"{where}[{i}]") for i, d in enumerate(items)]


def require_mapping(value: Any, field: str, keys: str) -> None:
    """One clear line when a config field that holds a mapping (of ``keys`` to values) holds something else."""
    if not isinstance(value, dict):
        raise LeaklabError(f"{field} must be a mapping of {keys} to values")


def risk_of(value: float | None, high: float, medium: float) -> str:
    """``high`` at or above ``high``, ``medium`` at or above ``medium``, else ``low``; unknown without a value."""
    if value is None:
        return "unknown"
    return "high" if value >= high else "medium" if value >= medium else "low"


@contextmanager
def prefixed(where: str) -> Iterator[None]:
    """Re-raise a :class:`LeaklabError` of the block as one line starting with ``where`` (the config field)."""
    try:
        yield
    except LeaklabError as exc:
        raise LeaklabError(f"{where}: {exc}") from None


def scaled_count(n: int, scale: float, floor: int) -> int:
    """``n`` scaled down by ``scale`` (< 1) but never below ``floor`` (nor above ``n``)."""
    return n if scale >= 1 else min(n, max(floor, math.floor(n * scale)))


def best_evidence(evidences: list[Evidence], fallback: Evidence) -> Evidence:
    """The riskiest of a surface's evidences (the first of equal risk); ``fallback`` when none."""
    return min(evidences, key=lambda e: RISK_LEVELS.index(e.risk)) if evidences else fallback


def fmt(x: Any, digits: int = 3) -> str:
    """A report cell: – for missing, ∞, a float to ``digits`` decimals, anything else as text."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return "∞" if math.isinf(x) else f"{x:.{digits}f}"
    return str(x)


def report_section(
    evidence: Evidence,
    flags: list[str],
    *,
    tables: Sequence[dict[str, Any]] = (),
    examples: Sequence[dict[str, Any]] = (),
    plots: Sequence[dict[str, str]] = (),
    notes: Sequence[str] = (),
    recommendation: str | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A surface's report section (what :meth:`Surface.summarise` returns)."""
    return {
        "evidence": evidence,
        "flags": flags,
        "tables": list(tables),
        "examples": list(examples),
        "plots": list(plots),
        "notes": list(notes),
        "recommendation": recommendation,
        "data": data or {},
    }


def new_figure(width: float = 7, height: float = 4) -> tuple[Any, Any]:
    """A matplotlib figure and axes on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def embedded_plot(fig: Any, title: str) -> dict[str, str]:
    """The report's plot entry: ``fig`` laid out, embedded as a data URI, and closed."""
    import matplotlib.pyplot as plt

    from leaklab.report.html import figure_uri

    fig.tight_layout()
    uri = figure_uri(fig)
    plt.close(fig)
    return {"title": title, "uri": uri}


@dataclass(frozen=True)
class EncoderTarget(Config):
    """The encoder under audit: a local one, or a live endpoint and its key (sections embedding, api-defenses,
    kb-secrets start with these keys)."""

    encoder: str = option("minilm-l6", "packaged encoder, encoder folder, or http(s)://host:port[#model] endpoint")
    api_key_env: str | None = option(None, "environment variable holding the endpoint's API key")

    def check_encoder(self, where: str) -> None:
        from leaklab.experiments.audit.config import require_encoder

        require_encoder(self.encoder, self.api_key_env, f"{where}.encoder")

    def key(self) -> str | None:
        from leaklab.experiments.audit.config import api_key

        return api_key(self.api_key_env)


def check_embed_attack(name: str, options: Any, where: str) -> None:
    """An embedding attack's options, checked by its own Config; errors start with ``where``."""
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS

    with prefixed(where):
        EMBED_ATTACKS.get(name).options(options)


def run_embed_attack(attack: str, spec: dict[str, Any], n: int, key: str | None) -> dict[str, Any]:
    """One embedding attack through the runner on the scenario ``spec`` names (encoder, corpus, seed and, if
    given, max_tokens) with ``n`` targets: its run record."""
    from leaklab.attacks.embedding.registry import Scenario
    from leaklab.experiments.runner import run_embedding

    lengths = {"max_tokens": spec["max_tokens"]} if "max_tokens" in spec else {}
    scn = Scenario(encoder=spec["encoder"], corpus=spec["corpus"], n=n, seed=spec["seed"], api_key=key, **lengths)
    return run_embedding(attack, scn, spec["options"]).to_dict()
