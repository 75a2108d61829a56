"""API-level defenses applied to L2-normalised embedding vectors before they leave the service."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import ClassVar

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from leaklab.core import Config, Registry, option
from leaklab.encoders import normalise
from leaklab.errors import LeaklabError, UnknownNameError

L2_SENSITIVITY = 2.0  # two unit vectors differ by at most 2 in L2


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = L2_SENSITIVITY) -> float:
    """Smallest σ of the Gaussian mechanism that is (ε, δ)-DP (Balle & Wang 2018, Thm. 8):
    Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) ≤ δ."""
    if epsilon <= 0 or not 0 < delta < 1:
        raise LeaklabError(f"gaussian noise needs epsilon > 0 and 0 < delta < 1 (got epsilon={epsilon}, delta={delta})")

    def excess(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return float(norm.cdf(a - b) - math.exp(min(epsilon + norm.logcdf(-a - b), 700.0)) - delta)

    lo, hi = 1e-6, 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(brentq(excess, lo, hi, xtol=1e-10))


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = L2_SENSITIVITY) -> float:
    """σ = Δ·sqrt(2 ln(1.25/δ))/ε (Dwork & Roth A.1, valid for ε < 1); >= the analytic σ."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def as_number(v: object, where: str) -> float:
    """A finite number from a number or a numeric string (YAML reads ``1e-5`` as a string)."""
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            v = float(v)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise LeaklabError(f"{where} must be a number (got {v!r})")
    return v


def _positive(value: float, kind: str, name: str) -> None:
    """Refuse anything but a finite number > 0."""
    if not 0 < value < math.inf:
        raise LeaklabError(f"{kind} needs {name} > 0, finite (got {name}={value})")


@dataclass(frozen=True)
class ApiDefense(Config):
    """One transform on a batch of unit vectors (n, d); the defense is the frozen config of its options."""

    kind: ClassVar[str] = ""

    def apply(self, x: np.ndarray, tenant: str, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def label(self) -> str:
        """How the request log names this defense."""
        return self.kind


@dataclass(frozen=True)
class GaussianNoise(ApiDefense):
    """x + N(0, σ²I) with σ from (ε, δ) by the analytic Gaussian mechanism, sensitivity 2 on unit vectors."""

    epsilon: float = option(1.0, "ε of the (ε, δ) guarantee per returned vector (> 0)")
    delta: float = option(1e-5, "δ, in (0, 1)")
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _positive(self.epsilon, "gaussian noise", "epsilon")
        if not 0 < self.delta < 1:
            raise LeaklabError(f"gaussian noise needs 0 < delta < 1 (got delta={self.delta})")

    @cached_property
    def sigma(self) -> float:
        return analytic_gaussian_sigma(self.epsilon, self.delta)

    def apply(self, x, tenant, rng):
        return x + rng.standard_normal(x.shape).astype(np.float32) * np.float32(self.sigma)

    def label(self) -> str:
        return f"gaussian(eps={self.epsilon:g},delta={self.delta:g},sigma={self.sigma:.4g})"


@dataclass(frozen=True)
class MetricDPNoise(ApiDefense):
    """Metric-DP: x + r·u, u uniform on the sphere, r ~ Gamma(d, 1/ε); density ∝ exp(−ε‖z‖)."""

    epsilon: float = option(10.0, "ε of the metric-DP guarantee (> 0)")
    kind: ClassVar[str] = "metric-dp"

    def __post_init__(self) -> None:
        _positive(self.epsilon, "metric-dp", "epsilon")

    def apply(self, x, tenant, rng):
        n, d = x.shape
        u = normalise(rng.standard_normal((n, d)))
        r = rng.gamma(shape=d, scale=1.0 / self.epsilon, size=(n, 1))
        return x + (u * r).astype(np.float32)

    def label(self) -> str:
        return f"metric-dp(eps={self.epsilon:g})"


@dataclass(frozen=True)
class Quantise(ApiDefense):
    """Uniform scalar quantisation of each coordinate to 2^bits levels over [−clip, clip] (absmax-style)."""

    bits: int = option(8, "bits per coordinate, 1 to 16")
    clip: float = option(0.5, "coordinates are clipped to [−clip, clip] (> 0)")
    kind: ClassVar[str] = "quantise"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise LeaklabError(f"quantise needs 1 <= bits <= 16 (got {self.bits})")
        _positive(self.clip, "quantise", "clip")

    def apply(self, x, tenant, rng):
        levels = 2**self.bits - 1
        step = 2 * self.clip / levels
        q = np.round((np.clip(x, -self.clip, self.clip) + self.clip) / step)
        return (q * step - self.clip).astype(np.float32)

    def label(self) -> str:
        return f"quantise(bits={self.bits},clip={self.clip:g})"


@dataclass(frozen=True)
class Truncate(ApiDefense):
    """Keep the first ``dims`` coordinates (Matryoshka-style dimension truncation)."""

    dims: int = option(64, "coordinates kept (>= 1, at most the encoder's dimension)")
    kind: ClassVar[str] = "truncate"

    def __post_init__(self) -> None:
        if self.dims < 1:
            raise LeaklabError(f"truncate needs dims >= 1 (got {self.dims})")

    def apply(self, x, tenant, rng):
        if self.dims > x.shape[1]:
            raise LeaklabError(f"truncate dims={self.dims} exceeds the encoder dimension {x.shape[1]}")
        return np.ascontiguousarray(x[:, : self.dims])

    def label(self) -> str:
        return f"truncate(dims={self.dims})"


@lru_cache(maxsize=256)
def tenant_rotation(secret: str, tenant: str, dim: int) -> np.ndarray:
    """Orthogonal Q (dim×dim) from QR of a Gaussian matrix seeded by HMAC-SHA256(secret, tenant)."""
    digest = hmac.new(secret.encode(), f"{tenant}:{dim}".encode(), hashlib.sha256).digest()
    g = np.random.default_rng(int.from_bytes(digest, "big")).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)


@dataclass(frozen=True)
class Rotate(ApiDefense):
    """x·Qᵀ with a secret orthogonal Q per tenant: cosines within a tenant are kept exactly."""

    secret: str = option("", "key of the per-tenant rotations (at least 16 characters)")
    kind: ClassVar[str] = "rotate"

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise LeaklabError("rotate needs a 'secret' of at least 16 characters")

    def apply(self, x, tenant, rng):
        return x @ tenant_rotation(self.secret, tenant, x.shape[1]).T

    def label(self) -> str:
        return "rotate(per-tenant)"


def _builtins() -> None:
    for cls in (GaussianNoise, MetricDPNoise, Quantise, Truncate, Rotate):
        API_DEFENSES.register(cls.kind, cls, config=cls)


API_DEFENSES: Registry[type[ApiDefense]] = Registry("API defense", builtins=_builtins)


def make_api_defense(spec: dict, where: str = "defense") -> ApiDefense:
    """Build one defense from ``{"kind": ..., **options}``; unknown kinds or options name the valid ones."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise LeaklabError(
            f"{where}: each defense is a mapping with a 'kind' (one of {', '.join(API_DEFENSES.names())})"
        )
    kind = str(spec["kind"])
    if kind not in API_DEFENSES:
        raise UnknownNameError(f"API defense kind in {where}", kind, API_DEFENSES.names())
    try:
        return API_DEFENSES.get(kind).options({k: v for k, v in spec.items() if k != "kind"})
    except LeaklabError as exc:
        raise LeaklabError(f"{where}: {exc}") from None


@dataclass
class Pipeline:
    """Defenses applied in order; the result is re-normalised to unit length (post-processing keeps DP)."""

    steps: list[ApiDefense] = field(default_factory=list)
    renormalise: bool = True

    def apply(self, x: np.ndarray, tenant: str, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        out = np.asarray(x, dtype=np.float32)
        for step in self.steps:
            out = step.apply(out, tenant, rng)
        return normalise(out) if self.renormalise and self.steps else out

    def describe(self) -> str:
        return "+".join(s.label() for s in self.steps) or "none"

    def with_extra(self, extra: ApiDefense) -> Pipeline:
        """This pipeline with ``extra`` inserted before quantisation/truncation/rotation."""
        noise = [s for s in self.steps if s.kind in ("gaussian", "metric-dp")]
        rest = [s for s in self.steps if s.kind not in ("gaussian", "metric-dp")]
        return Pipeline([*noise, extra, *rest], self.renormalise)


def make_pipeline(specs: list[dict] | None, where: str = "defenses") -> Pipeline:
    if specs is None:
        return Pipeline([])
    if not isinstance(specs, list):
        raise LeaklabError(f"{where} must be a list of defenses")
    return Pipeline([make_api_defense(s, f"{where}[{i}]") for i, s in enumerate(specs)])
