"""API-level defenses applied to L2-normalised embedding vectors before they leave the service."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

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


@dataclass
class Defense:
    """One transform on a batch of unit vectors (n, d)."""

    kind: str = ""

    def apply(self, x: np.ndarray, tenant: str, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


@dataclass
class GaussianNoise(Defense):
    """x + N(0, σ²I) with σ from (ε, δ) by the analytic Gaussian mechanism, sensitivity 2 on unit vectors."""

    epsilon: float = 1.0
    delta: float = 1e-5
    sigma: float = field(init=False)

    def __post_init__(self) -> None:
        self.kind = "gaussian"
        self.sigma = analytic_gaussian_sigma(self.epsilon, self.delta)

    def apply(self, x, tenant, rng):
        return x + rng.standard_normal(x.shape).astype(np.float32) * np.float32(self.sigma)

    def describe(self) -> str:
        return f"gaussian(eps={self.epsilon:g},delta={self.delta:g},sigma={self.sigma:.4g})"


@dataclass
class MetricDPNoise(Defense):
    """Metric-DP: x + r·u, u uniform on the sphere, r ~ Gamma(d, 1/ε); density ∝ exp(−ε‖z‖)."""

    epsilon: float = 10.0

    def __post_init__(self) -> None:
        self.kind = "metric-dp"
        if self.epsilon <= 0:
            raise LeaklabError(f"metric-dp needs epsilon > 0 (got {self.epsilon})")

    def apply(self, x, tenant, rng):
        n, d = x.shape
        u = normalise(rng.standard_normal((n, d)))
        r = rng.gamma(shape=d, scale=1.0 / self.epsilon, size=(n, 1))
        return x + (u * r).astype(np.float32)

    def describe(self) -> str:
        return f"metric-dp(eps={self.epsilon:g})"


@dataclass
class Quantise(Defense):
    """Uniform scalar quantisation of each coordinate to 2^bits levels over [−clip, clip] (absmax-style)."""

    bits: int = 8
    clip: float = 0.5

    def __post_init__(self) -> None:
        self.kind = "quantise"
        if not 1 <= self.bits <= 16 or self.clip <= 0:
            raise LeaklabError(f"quantise needs 1 <= bits <= 16 and clip > 0 (got bits={self.bits}, clip={self.clip})")

    def apply(self, x, tenant, rng):
        levels = 2**self.bits - 1
        step = 2 * self.clip / levels
        q = np.round((np.clip(x, -self.clip, self.clip) + self.clip) / step)
        return (q * step - self.clip).astype(np.float32)

    def describe(self) -> str:
        return f"quantise(bits={self.bits},clip={self.clip:g})"


@dataclass
class Truncate(Defense):
    """Keep the first ``dims`` coordinates (Matryoshka-style dimension truncation)."""

    dims: int = 64

    def __post_init__(self) -> None:
        self.kind = "truncate"
        if self.dims < 1:
            raise LeaklabError(f"truncate needs dims >= 1 (got {self.dims})")

    def apply(self, x, tenant, rng):
        if self.dims > x.shape[1]:
            raise LeaklabError(f"truncate dims={self.dims} exceeds the encoder dimension {x.shape[1]}")
        return np.ascontiguousarray(x[:, : self.dims])

    def describe(self) -> str:
        return f"truncate(dims={self.dims})"


@lru_cache(maxsize=256)
def tenant_rotation(secret: str, tenant: str, dim: int) -> np.ndarray:
    """Orthogonal Q (dim×dim) from QR of a Gaussian matrix seeded by HMAC-SHA256(secret, tenant)."""
    digest = hmac.new(secret.encode(), f"{tenant}:{dim}".encode(), hashlib.sha256).digest()
    g = np.random.default_rng(int.from_bytes(digest, "big")).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)


@dataclass
class Rotate(Defense):
    """x·Qᵀ with a secret orthogonal Q per tenant: cosines within a tenant are kept exactly."""

    secret: str = ""

    def __post_init__(self) -> None:
        self.kind = "rotate"
        if len(self.secret) < 16:
            raise LeaklabError("rotate needs a 'secret' of at least 16 characters")

    def apply(self, x, tenant, rng):
        return x @ tenant_rotation(self.secret, tenant, x.shape[1]).T

    def describe(self) -> str:
        return "rotate(per-tenant)"


DEFENSES: dict[str, type[Defense]] = {
    "gaussian": GaussianNoise,
    "metric-dp": MetricDPNoise,
    "quantise": Quantise,
    "truncate": Truncate,
    "rotate": Rotate,
}
_PARAMS = {
    "gaussian": {"epsilon", "delta"},
    "metric-dp": {"epsilon"},
    "quantise": {"bits", "clip"},
    "truncate": {"dims"},
    "rotate": {"secret"},
}


def make_defense(spec: dict, where: str = "defense") -> Defense:
    """Build one defense from ``{"kind": ..., **params}``; unknown kinds or parameters name the valid ones."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise LeaklabError(f"{where}: each defense is a mapping with a 'kind' (one of {', '.join(DEFENSES)})")
    kind = spec["kind"]
    if kind not in DEFENSES:
        raise UnknownNameError(f"defense kind in {where}", str(kind), list(DEFENSES))
    params = {k: v for k, v in spec.items() if k != "kind"}
    extra = set(params) - _PARAMS[kind]
    if extra:
        raise LeaklabError(
            f"{where}: {kind} has no parameter(s) {', '.join(sorted(extra))}; valid: {', '.join(sorted(_PARAMS[kind]))}"
        )
    for k, v in list(params.items()):
        if k != "secret":
            params[k] = as_number(v, f"{where}: {kind}.{k}")
    for k in ("bits", "dims"):
        if k in params:
            if params[k] != int(params[k]):
                raise LeaklabError(f"{where}: {kind}.{k} must be an integer (got {params[k]!r})")
            params[k] = int(params[k])
    return DEFENSES[kind](**params)


@dataclass
class Pipeline:
    """Defenses applied in order; the result is re-normalised to unit length (post-processing keeps DP)."""

    steps: list[Defense] = field(default_factory=list)
    renormalise: bool = True

    def apply(self, x: np.ndarray, tenant: str, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        out = np.asarray(x, dtype=np.float32)
        for step in self.steps:
            out = step.apply(out, tenant, rng)
        return normalise(out) if self.renormalise and self.steps else out

    def describe(self) -> str:
        return "+".join(s.describe() for s in self.steps) or "none"

    def with_extra(self, extra: Defense) -> Pipeline:
        """This pipeline with ``extra`` inserted before quantisation/truncation/rotation."""
        noise = [s for s in self.steps if s.kind in ("gaussian", "metric-dp")]
        rest = [s for s in self.steps if s.kind not in ("gaussian", "metric-dp")]
        return Pipeline([*noise, extra, *rest], self.renormalise)


def make_pipeline(specs: list[dict] | None, where: str = "defenses") -> Pipeline:
    if specs is None:
        return Pipeline([])
    if not isinstance(specs, list):
        raise LeaklabError(f"{where} must be a list of defenses")
    return Pipeline([make_defense(s, f"{where}[{i}]") for i, s in enumerate(specs)])
