"""The audit's configuration: one YAML file, validated section by section before any work starts.

Top level: the general keys of :class:`AuditOptions` and one section per audit surface (its name, its own
:class:`leaklab.core.Config`). An unknown key anywhere is one error naming it and the valid keys; a missing
file, an unreachable endpoint or a model that is not a causal LM where one is needed is one error too
(:func:`preflight`), raised before any model is trained or attacked.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from leaklab.core import Config, option
from leaklab.errors import LeaklabError


@dataclass(frozen=True)
class AuditOptions(Config):
    """General options of an audit (top-level keys of the config file)."""

    seed: int = option(0, "seed of every private batch, victim sample and attack")
    time_budget_min: float = option(15.0, "wall-clock budget in minutes: batches and samples are scaled to fit")
    leak_threshold: float = option(0.2, "an attack counts as stopped when its leak metric is at or below this")
    corpus: str = option(
        "rotten-tomatoes",
        "the representative texts: a packaged corpus or a .txt/.csv/.jsonl file; a fixed hash puts 30 % of them in "
        "the private split (the victim's texts, scoring only) and 70 % in the public split (the attacker's)",
    )
    min_tokens: int = option(8, "shortest private text used, in tokens")
    max_tokens: int = option(32, "longest private text used, in tokens")

    def __post_init__(self) -> None:
        self.require(positive=("time_budget_min", "min_tokens"))
        if not 0 < self.leak_threshold < 1:
            raise LeaklabError(f"leak_threshold must be in (0, 1), got {self.leak_threshold}")
        if self.max_tokens < self.min_tokens:
            raise LeaklabError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")


@dataclass(frozen=True)
class AuditConfig:
    """A parsed audit file: the general options, each configured surface's section, and the raw text."""

    options: AuditOptions
    sections: dict[str, Config]
    unavailable: dict[str, dict[str, Any]]  # sections of surfaces this leaklab version does not provide
    raw: dict[str, Any]
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.options.to_dict(),
            **{name: cfg.to_dict() for name, cfg in self.sections.items()},
            **self.unavailable,
        }


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file or bad YAML is one clear error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LeaklabError(f"audit config '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LeaklabError(f"audit config '{path}' is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LeaklabError(f"audit config '{path}' must be a mapping of keys to values")
    return data


def parse_config(data: dict[str, Any], path: str | None = None) -> AuditConfig:
    """Split ``data`` into the general options and the surfaces' sections, each validated by its Config."""
    from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, PLANNED, load_planned

    load_planned()
    general = set(AuditOptions.keys())
    surfaces = AUDIT_SURFACES.names()
    valid = [*sorted(general), *surfaces, *sorted(set(PLANNED) - set(surfaces))]
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise LeaklabError(f"audit config has no key {', '.join(repr(k) for k in unknown)}; valid: {', '.join(valid)}")
    options = AuditOptions.from_dict({k: v for k, v in data.items() if k in general}, "audit config")
    sections: dict[str, Config] = {}
    unavailable: dict[str, dict[str, Any]] = {}
    for name in data:
        if name in general:
            continue
        body = data[name] if data[name] is not None else {}
        if not isinstance(body, dict):
            raise LeaklabError(f"audit config section '{name}' must be a mapping of keys to values")
        if name in surfaces:
            sections[name] = AUDIT_SURFACES.get(name).options(body)
        else:
            unavailable[name] = body
    return AuditConfig(options, sections, unavailable, data, path)


def schema() -> list[dict[str, Any]]:
    """Every key of an audit config: the general options, then each surface's section and the mappings of its
    lists, with type, default and help (``leaklab audit keys``)."""
    from leaklab.experiments.audit.surfaces import AUDIT_SURFACES, load_planned

    load_planned()
    rows = [{"where": "(top level)", **r} for r in AuditOptions.describe()]
    for entry in AUDIT_SURFACES.entries():
        rows += [{"where": entry.name, **r} for r in entry.config.describe()]
        for key, cls in entry.extra.get("items", {}).items():
            rows += [{"where": f"{entry.name}.{key}[]", **r} for r in cls.describe()]
    return rows


def load_config(path: str | Path) -> AuditConfig:
    return parse_config(read_yaml(path), str(path))


def preflight(config: AuditConfig) -> None:
    """Everything the audit will need, checked cheaply before any work: the corpus, each surface's models,
    encoders and endpoints (one error, naming what is wrong, on the first problem)."""
    from leaklab.corpora import load_corpus
    from leaklab.experiments.audit.surfaces import AUDIT_SURFACES

    load_corpus(config.options.corpus)
    for name, section in config.sections.items():
        AUDIT_SURFACES.get(name).impl.preflight(section, config.options)


def require_causal_lm(name: str, where: str) -> None:
    """``name`` (a packaged model, a Hugging Face folder or a cached hub name) must be a causal LM, checked from
    its config only (no weights are loaded)."""
    from leaklab.models.registry import PACKAGED, _is_decoder_config, hub_offline

    spec = PACKAGED.get(name)
    if spec is not None:
        if "next-token" not in spec.tasks:
            raise LeaklabError(f"{where}: '{name}' is not a causal LM ({spec.description}); give a decoder model")
        return
    folder = os.path.expanduser(name)
    is_folder = os.path.isdir(folder)
    if not is_folder and "/" not in name:
        from leaklab.models.registry import model_names

        raise LeaklabError(
            f"{where}: unknown model '{name}'; valid: {', '.join(model_names())} or a Hugging Face folder or hub name"
        )
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(folder if is_folder else name, local_files_only=is_folder or hub_offline())
    except (OSError, ValueError):
        raise LeaklabError(
            f"{where}: model '{name}' cannot be found (not a model folder nor a cached hub name)"
        ) from None
    if not _is_decoder_config(cfg):
        raise LeaklabError(f"{where}: '{name}' is not a causal LM ({cfg.model_type}); give a decoder model")


def require_encoder(spec: str, api_key_env: str | None, where: str) -> None:
    """A local encoder name or folder must exist; an http(s) endpoint must accept a TCP connection and its key's
    environment variable, when named, must be set."""
    from leaklab.encoders import LOCAL_ENCODERS

    if spec.startswith(("http://", "https://")):
        url = urlparse(spec.partition("#")[0])
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            raise LeaklabError(f"{where}: endpoint {spec} is unreachable ({exc.strerror or exc})") from None
        if api_key_env and not os.environ.get(api_key_env):
            raise LeaklabError(f"{where}: the endpoint's key variable {api_key_env} is not set")
        return
    if spec not in LOCAL_ENCODERS and not os.path.isdir(os.path.expanduser(spec)):
        raise LeaklabError(
            f"{where}: unknown encoder '{spec}'; valid: {', '.join(LOCAL_ENCODERS)}, an encoder folder or an "
            "http(s):// endpoint"
        )


def api_key(api_key_env: str | None) -> str | None:
    return os.environ.get(api_key_env) if api_key_env else None
