"""Defenses on the shared update: L2 clipping, Gaussian and Laplace noise, top-k sparsification, frozen
embeddings, and larger aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leaklab.core import option
from leaklab.defenses.base import DefenseConfig, Side, require_tensors, with_update
from leaklab.errors import LeaklabError
from leaklab.threat.observation import Observation, grad_norm


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numel(obs: Observation) -> int:
    return sum(g.numel() for g in obs.gradients.values())


def clip_bound(obs: Observation) -> float | None:
    """The L2 bound of the update set by an earlier clip or DP-SGD step (its sensitivity), if any."""
    bound = None
    for rec in obs.meta.get("defenses", []):
        if rec["name"] == "clip":
            bound = rec["params"]["max_norm"]
    return bound


@dataclass(frozen=True)
class Clip(DefenseConfig):
    """u ← u · min(1, C / ‖u‖₂) over the whole update (all tensors as one vector)."""

    max_norm: float = option(1.0, "L2 bound C of the whole update (> 0)")
    name: ClassVar[str] = "clip"
    side: ClassVar[Side] = "server"

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise LeaklabError(f"clip max_norm must be > 0, got {self.max_norm}")

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        require_tensors(obs, self.name)
        norm = grad_norm(obs.gradients)
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        return with_update(obs, {k: g * scale for k, g in obs.gradients.items()}, self.record())


@dataclass(frozen=True)
class Gaussian(DefenseConfig):
    """u ← u + N(0, σ²I). σ given, or the classical Gaussian mechanism σ = Δ₂·√(2 ln(1.25/δ))/ε
    (Dwork–Roth Thm A.1, proven for ε < 1), Δ₂ = ``sensitivity`` or the bound of an earlier clip."""

    sigma: float | None = option(None, "noise standard deviation σ (or give epsilon)")
    epsilon: float | None = option(None, "target ε: σ from the Gaussian mechanism (or give sigma)")
    delta: float = option(1e-5, "δ of the (ε, δ) calibration")
    sensitivity: float | None = option(None, "L2 sensitivity Δ₂ (default: the bound of an earlier clip)")
    name: ClassVar[str] = "gaussian"
    side: ClassVar[Side] = "server"

    def __post_init__(self) -> None:
        if (self.sigma is None) == (self.epsilon is None):
            raise LeaklabError("gaussian noise needs exactly one of sigma or epsilon")
        if self.sigma is not None and self.sigma < 0:
            raise LeaklabError(f"sigma must be >= 0, got {self.sigma}")
        if self.epsilon is not None and not (self.epsilon > 0 and 0 < self.delta < 1):
            raise LeaklabError("gaussian calibration needs epsilon > 0 and 0 < delta < 1")

    def std(self, obs: Observation) -> tuple[float, float | None]:
        if self.sigma is not None:
            return self.sigma, None
        sens = self.sensitivity if self.sensitivity is not None else clip_bound(obs)
        if sens is None:
            raise LeaklabError(
                "calibrating gaussian noise from epsilon needs an L2 sensitivity: clip the update first "
                "(--defense clip) or pass sensitivity=..."
            )
        return sens * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon, sens

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        require_tensors(obs, self.name)
        std, sens = self.std(obs)
        gen = _generator(seed)
        noisy = {k: g + std * torch.randn(g.shape, generator=gen, dtype=g.dtype) for k, g in obs.gradients.items()}
        return with_update(obs, noisy, self.record(std=std, sensitivity=sens))


@dataclass(frozen=True)
class Laplace(DefenseConfig):
    """u ← u + Lap(0, b) per coordinate. b given, or b = Δ₁/ε (pure ε-DP), Δ₁ = ``sensitivity`` or
    √d·C from an earlier L2 clip to C over d coordinates (‖u‖₁ ≤ √d‖u‖₂)."""

    scale: float | None = option(None, "Laplace scale b (or give epsilon)")
    epsilon: float | None = option(None, "target ε: b = Δ₁/ε (or give scale)")
    sensitivity: float | None = option(None, "L1 sensitivity Δ₁ (default: √d·C from an earlier clip)")
    name: ClassVar[str] = "laplace"
    side: ClassVar[Side] = "server"

    def __post_init__(self) -> None:
        if (self.scale is None) == (self.epsilon is None):
            raise LeaklabError("laplace noise needs exactly one of scale or epsilon")
        if self.scale is not None and self.scale < 0:
            raise LeaklabError(f"laplace scale must be >= 0, got {self.scale}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise LeaklabError(f"epsilon must be > 0, got {self.epsilon}")

    def b(self, obs: Observation) -> tuple[float, float | None]:
        if self.scale is not None:
            return self.scale, None
        sens = self.sensitivity
        if sens is None:
            bound = clip_bound(obs)
            if bound is None:
                raise LeaklabError(
                    "calibrating laplace noise from epsilon needs an L1 sensitivity: clip the update first "
                    "(--defense clip) or pass sensitivity=..."
                )
            sens = math.sqrt(_numel(obs)) * bound
        return sens / self.epsilon, sens

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        require_tensors(obs, self.name)
        b, sens = self.b(obs)
        gen = _generator(seed)
        out = {}
        for k, g in obs.gradients.items():
            u = torch.rand(g.shape, generator=gen, dtype=torch.float64) - 0.5  # inverse CDF of Lap(0, b)
            out[k] = g - (b * torch.sign(u) * torch.log1p(-2 * u.abs())).to(g.dtype)
        return with_update(obs, out, self.record(scale=b, sensitivity=sens))


@dataclass(frozen=True)
class TopK(DefenseConfig):
    """Keep the k = ⌈f·d⌉ largest-magnitude coordinates of the whole update, zero the rest."""

    fraction: float = option(0.01, "fraction f of coordinates kept, in (0, 1]")
    name: ClassVar[str] = "topk"
    side: ClassVar[Side] = "server"

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise LeaklabError(f"top-k fraction must be in (0, 1], got {self.fraction}")

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        require_tensors(obs, self.name)
        names = list(obs.gradients)
        flat = torch.cat([obs.gradients[n].reshape(-1) for n in names])
        k = math.ceil(self.fraction * flat.numel())
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
        out, start = {}, 0
        for n in names:
            g = obs.gradients[n]
            mask = keep[start : start + g.numel()].view(g.shape)
            out[n] = g * mask
            start += g.numel()
        return with_update(obs, out, self.record(kept=k, total=flat.numel()))


def embedding_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every nn.Embedding table (tokens, positions, token types); a tied LM head is the same tensor."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: p for n, p in model.named_parameters() if id(p) in tables}


@dataclass(frozen=True)
class FrozenEmbeddings(DefenseConfig):
    """The client trains with every embedding table frozen, so none is shared. On a one-step gradient this
    equals dropping those tensors; a multi-step update must be made with it (client side)."""

    name: ClassVar[str] = "frozen-embeddings"
    side: ClassVar[Side] = "client"

    def prepare(self, model: nn.Module) -> None:
        params = {n: p for n, p in embedding_params(model).items() if p.requires_grad}
        if not params:
            raise LeaklabError(
                "frozen-embeddings does not apply: no embedding table is trained in this setting (LoRA?)"
            )
        for p in params.values():
            p.requires_grad_(False)

    def gradient(self, model, objective, seed):
        return None

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        from leaklab.threat.store import _shared_model

        if obs.flags.local_steps > 1 or obs.meta.get("optimizer_steps", 1) > 1:
            raise LeaklabError(
                "frozen-embeddings on a multi-step update must act during training: pass it to the client "
                "(defended_update / --defense on update-setting), not to a computed update"
            )
        names = set(embedding_params(_shared_model(obs.model, obs.meta))) & set(obs.gradients)
        if not names:
            raise LeaklabError(f"frozen-embeddings does not apply: the {obs.setting} update has no embedding tensor")
        kept = {k: g for k, g in obs.gradients.items() if k not in names}
        return with_update(obs, kept, self.record(dropped=sorted(names)))


@dataclass(frozen=True)
class Aggregate(DefenseConfig):
    """Secure aggregation over ``clients`` clients: the server sees the mean of their updates (protocol)."""

    clients: int = option(8, "clients whose updates the server sees only as a mean (>= 1)")
    name: ClassVar[str] = "aggregate"
    side: ClassVar[Side] = "protocol"

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise LeaklabError(f"aggregate needs clients >= 1, got {self.clients}")

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        raise LeaklabError(
            "aggregate changes the protocol (the other clients' private batches are needed): pass it to "
            "defended_update / update-setting, not to a computed update"
        )
