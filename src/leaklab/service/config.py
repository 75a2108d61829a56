"""Service configuration (YAML or JSON), validated with errors that name the offending field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leaklab.errors import LeaklabError
from leaklab.service.defenses import Pipeline, as_number, make_pipeline
from leaklab.service.search_scores import ScoreView


@dataclass(frozen=True)
class Limits:
    """Token bucket (rate per second, burst) and daily quotas in requests and tokens; 0 means unlimited."""

    rate: float = 20.0
    burst: int = 40
    daily_requests: int = 10_000
    daily_tokens: int = 1_000_000
    max_inputs: int = 256
    max_chars: int = 20_000
    max_request_tokens: int = 16_384  # tokens of one request (the encoder's count, before truncation)
    max_concurrent: int = 2  # requests of one key in flight at once; more wait in the key's queue


@dataclass(frozen=True)
class MonitorConfig:
    """Probe detector: window, score threshold and the action on a flag (flag | throttle | noise). Under
    ``noise`` a flagged key's vectors get extra noise (``noise_epsilon``) and its /v1/search answers escalate
    as ``search_escalation`` says: ``ids-only`` (scores withheld) or ``score-noise`` (Gaussian noise of σ
    ``search_score_noise`` on every score, or the configured σ if that is larger)."""

    enabled: bool = True
    window: int = 64
    min_queries: int = 16
    threshold: float = 0.25  # above the 1%-FPR thresholds measured in benchmarks/results/service.md
    action: str = "flag"
    throttle_factor: float = 0.1
    noise_epsilon: float = 50.0
    search_escalation: str = "ids-only"
    search_score_noise: float = 0.05

    def escalate(self, view: ScoreView) -> ScoreView:
        """What a flagged key's searches return under the ``noise`` action."""
        if self.search_escalation == "ids-only":
            return replace(view, scores=False)
        return replace(view, noise=max(view.noise, self.search_score_noise))


@dataclass(frozen=True)
class ServerConfig:
    """Request handling: the body-size limit (bytes, checked before the body is read), how long a request may
    wait for its key's turn before a 503, and how many texts the encoder runs per turn (fair interleaving)."""

    max_body_bytes: int = 2_000_000
    queue_timeout_s: float = 10.0
    encode_chunk: int = 16


@dataclass(frozen=True)
class SearchConfig:
    """The searched documents and what /v1/search returns: scores (false: ids only), Gaussian noise of σ
    ``score_noise`` on each score, scores quantised to multiples of ``score_step`` (0: off)."""

    corpus: str | None = None
    limit: int = 2000
    max_top_k: int = 100
    scores: bool = True
    score_noise: float = 0.0
    score_step: float = 0.0

    def view(self) -> ScoreView:
        return ScoreView(self.scores, self.score_noise, self.score_step)


@dataclass
class ServiceConfig:
    limits: Limits = field(default_factory=Limits)
    key_limits: dict[str, Limits] = field(default_factory=dict)
    defenses: Pipeline = field(default_factory=Pipeline)
    key_defenses: dict[str, Pipeline] = field(default_factory=dict)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    durability: str = "normal"
    raw: dict[str, Any] = field(default_factory=dict)

    def limits_for(self, key_name: str) -> Limits:
        return self.key_limits.get(key_name, self.limits)

    def pipeline_for(self, key_name: str) -> Pipeline:
        return self.key_defenses.get(key_name, self.defenses)


_TOP = {"limits", "defenses", "monitor", "search", "server", "keys", "durability"}
ACTIONS = ("flag", "throttle", "noise")
SEARCH_ESCALATIONS = ("ids-only", "score-noise")


def _dataclass_from(cls: type, data: Any, where: str, base: Any = None) -> Any:
    if data is None:
        return base if base is not None else cls()
    if not isinstance(data, dict):
        raise LeaklabError(f"config: '{where}' must be a mapping")
    valid = {f for f in cls.__dataclass_fields__}
    extra = set(data) - valid
    if extra:
        raise LeaklabError(
            f"config: '{where}' has unknown field(s) {', '.join(sorted(extra))}; valid: {', '.join(sorted(valid))}"
        )
    defaults = base if base is not None else cls()
    values = {}
    for name in valid:
        default = getattr(defaults, name)
        v = data.get(name, default)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise LeaklabError(f"config: '{where}.{name}' must be true or false (got {v!r})")
        elif isinstance(default, int | float) and default is not None:
            v = as_number(v, f"config: '{where}.{name}'")
            if v < 0:
                raise LeaklabError(f"config: '{where}.{name}' must be a number >= 0 (got {v!r})")
            if isinstance(default, int) and not isinstance(default, bool) and v != int(v):
                raise LeaklabError(f"config: '{where}.{name}' must be an integer (got {v!r})")
            v = type(default)(v)
        values[name] = v
    return cls(**values)


def _check_limits(limits: Limits, where: str) -> None:
    if limits.rate <= 0 or limits.burst < 1 or limits.max_concurrent < 1:
        raise LeaklabError(
            f"config: '{where}.rate' must be > 0, '{where}.burst' >= 1 and '{where}.max_concurrent' >= 1"
        )


def parse_config(data: Any, source: str = "config") -> ServiceConfig:
    """Validate a parsed config mapping into a :class:`ServiceConfig`."""
    data = data or {}
    if not isinstance(data, dict):
        raise LeaklabError(f"{source}: the top level must be a mapping with keys {', '.join(sorted(_TOP))}")
    extra = set(data) - _TOP
    if extra:
        raise LeaklabError(
            f"{source}: unknown top-level field(s) {', '.join(sorted(extra))}; valid: {', '.join(sorted(_TOP))}"
        )
    limits = _dataclass_from(Limits, data.get("limits"), "limits")
    _check_limits(limits, "limits")
    monitor = _dataclass_from(MonitorConfig, data.get("monitor"), "monitor")
    if monitor.action not in ACTIONS:
        raise LeaklabError(f"config: 'monitor.action' must be one of {', '.join(ACTIONS)} (got {monitor.action!r})")
    if monitor.search_escalation not in SEARCH_ESCALATIONS:
        raise LeaklabError(
            f"config: 'monitor.search_escalation' must be one of {', '.join(SEARCH_ESCALATIONS)} "
            f"(got {monitor.search_escalation!r})"
        )
    if monitor.search_score_noise <= 0:
        raise LeaklabError(f"config: 'monitor.search_score_noise' must be > 0 (got {monitor.search_score_noise})")
    search = _dataclass_from(SearchConfig, data.get("search"), "search")
    server = _dataclass_from(ServerConfig, data.get("server"), "server")
    if server.max_body_bytes < 1024 or server.encode_chunk < 1 or server.queue_timeout_s <= 0:
        raise LeaklabError(
            "config: 'server.max_body_bytes' must be >= 1024, 'server.encode_chunk' >= 1 and "
            "'server.queue_timeout_s' > 0"
        )
    durability = data.get("durability", "normal")
    if durability not in ("normal", "full"):
        raise LeaklabError(f"config: 'durability' must be 'normal' or 'full' (got {durability!r})")
    cfg = ServiceConfig(
        limits=limits,
        defenses=make_pipeline(data.get("defenses"), "defenses"),
        monitor=monitor,
        search=search,
        server=server,
        durability=durability,
        raw=data,
    )
    keys = data.get("keys") or {}
    if not isinstance(keys, dict):
        raise LeaklabError("config: 'keys' must map key names to {limits: ..., defenses: [...]}")
    for name, per in keys.items():
        if not isinstance(per, dict) or set(per) - {"limits", "defenses"}:
            raise LeaklabError(f"config: 'keys.{name}' may only hold 'limits' and 'defenses'")
        if "limits" in per:
            cfg.key_limits[name] = _dataclass_from(Limits, per["limits"], f"keys.{name}.limits", base=limits)
            _check_limits(cfg.key_limits[name], f"keys.{name}.limits")
        if "defenses" in per:
            cfg.key_defenses[name] = make_pipeline(per["defenses"], f"keys.{name}.defenses")
    return cfg


def load_config(path: str | Path | None) -> ServiceConfig:
    """Read a YAML (.yaml/.yml) or JSON config file; no path means the defaults (no defenses)."""
    if path is None:
        return parse_config({})
    p = Path(path)
    if not p.is_file():
        raise LeaklabError(f"config file {p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise LeaklabError(
            f"{p}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {str(exc).splitlines()[0]}"
        ) from exc
    return parse_config(data, str(p))
