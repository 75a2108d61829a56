"""Dropout masks as unknowns of a gradient-matching attack (GRAB, Wang et al., CCS 2025; written from the
paper's description: the client's dropout masks are optimised alongside the dummy input).

A client that computes its update with dropout on multiplies every dropout site's input by a Bernoulli mask
and 1/(1 − p). The server knows p (the model's config is public) and that dropout was on (a protocol fact,
``flags.train_mode``), not the masks. Here every active dropout call of a forward — ``F.dropout`` with
``training`` and p > 0, whether from an ``nn.Dropout`` module or a functional call such as eager attention's
— is intercepted by a torch function mode and replaced by x · m_k / (1 − p), the k-th call of the forward
taking mask m_k:

* :class:`RecordMasks` runs the real dropout and keeps the masks it drew (what a client drew);
* :class:`FixedMasks` replays given masks (test reference: with the client's masks it is the client's forward);
* :class:`RelaxedMasks` makes m_k = sigmoid(θ_k) learnable, one value per element of the site's input
  (per layer, position and feature; per head and key for attention probabilities), started at 1 − p so the
  first forward is the expected (eval) forward.

Attention dropout inside fused SDPA kernels never reaches ``F.dropout``: :func:`dropout_forward` switches
the model to train mode and eager attention for the duration, and restores both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from leaklab.errors import LeaklabError


def _dropout_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, float, bool]:
    """(input, p, training) of an ``F.dropout`` call, with its defaults."""
    x = args[0] if args else kwargs["input"]
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    return x, float(p), bool(training)


class DropoutSites(TorchFunctionMode):
    """Counts the active dropout calls of one forward (reset on entry) and hands each to :meth:`site`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __enter__(self) -> DropoutSites:
        self.calls = 0
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training = _dropout_args(args, kwargs)
            if training and p > 0:
                k = self.calls
                self.calls += 1
                return self.site(k, x, p, lambda: func(*args, **kwargs))
        return func(*args, **kwargs)

    def site(self, k: int, x: torch.Tensor, p: float, real: Callable[[], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class RecordMasks(DropoutSites):
    """The real dropout, with the masks it drew kept (1 where an element was kept) and each site's p."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.rates: list[float] = []

    def site(self, k: int, x: torch.Tensor, p: float, real: Callable[[], torch.Tensor]) -> torch.Tensor:
        out = real()
        self.masks.append((out.detach() != 0).to(x.dtype))
        self.rates.append(p)
        return out


class FixedMasks(DropoutSites):
    """Given masks, one per active call in order: x · m_k / (1 − p)."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks

    def site(self, k: int, x: torch.Tensor, p: float, real: Callable[[], torch.Tensor]) -> torch.Tensor:
        if k >= len(self.masks) or self.masks[k].shape != x.shape:
            raise LeaklabError(f"dropout site {k} of shape {tuple(x.shape)} has no matching mask")
        return x * self.masks[k] / (1 - p)


class RelaxedMasks(DropoutSites):
    """Learnable masks m_k = sigmoid(θ_k) ∈ (0, 1), created at a site's first call with m = 1 − p."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[torch.Tensor] = []
        self.rates: list[float] = []

    def site(self, k: int, x: torch.Tensor, p: float, real: Callable[[], torch.Tensor]) -> torch.Tensor:
        if k == len(self.logits):
            start = math.log((1 - p) / p)
            self.logits.append(torch.full(x.shape, start, device=x.device, dtype=x.dtype, requires_grad=True))
            self.rates.append(p)
        theta = self.logits[k]
        if theta.shape != x.shape:
            raise LeaklabError(f"dropout site {k} changed shape: {tuple(theta.shape)} → {tuple(x.shape)}")
        return x * torch.sigmoid(theta) / (1 - p)

    def masks(self) -> list[torch.Tensor]:
        """The current relaxed masks (detached)."""
        return [torch.sigmoid(t.detach()) for t in self.logits]

    def summary(self) -> dict[str, Any]:
        """Sites, elements, mean mask, and the share of elements read as dropped (m < 0.5)."""
        masks = self.masks()
        n = sum(m.numel() for m in masks)
        return {
            "sites": len(masks),
            "elements": n,
            "rates": sorted(set(self.rates)),
            "mean_mask": sum(float(m.sum()) for m in masks) / max(n, 1),
            "dropped_share": sum(float((m < 0.5).sum()) for m in masks) / max(n, 1),
        }


@contextmanager
def dropout_forward(model: nn.Module) -> Iterator[None]:
    """The model in train mode with eager attention (its attention dropout reaches ``F.dropout``); both
    restored on exit."""
    was_training = model.training
    impl = getattr(model.config, "_attn_implementation", None)
    switch = impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    model.train(True)
    try:
        yield
    finally:
        model.train(was_training)
        if switch:
            model.set_attn_implementation(impl)


class MaskedSpanTest:
    """The layer-1 span test with the input-dropout mask as unknowns (GPT-2 family: the first block's input
    is LN(m ⊙ (e_v + p_i) / (1 − p))).

    With P the projector off the span (orthonormal ``basis``, d × r) of the observed layer-1 inputs, γ, β the
    LayerNorm's affine and C the centring, an input of candidate z lies in the span iff
    P γ⊙C z − Σ_{j∈D} z_j P γ⊙C e_j + c P β = 0 for the dropped coordinates D and the inverse LN scale c
    (the 1/(1 − p) factor is absorbed in c). Free coefficients on the coordinate atoms make this a sparse
    least-squares problem; :meth:`residuals` solves it greedily (OMP: P β always in, then the coordinate atom
    most correlated with the residual, refit)."""

    def __init__(self, basis: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> None:
        d = gamma.shape[0]
        basis = basis.double()
        self.proj = torch.eye(d, dtype=torch.float64) - basis @ basis.T
        centre = torch.eye(d, dtype=torch.float64) - 1.0 / d
        self.lifted = torch.diag(gamma.double()) @ centre
        self.atoms = self.proj @ self.lifted
        self.shift = self.proj @ beta.double()
        self.atom_norms = self.atoms.norm(dim=0).clamp_min(1e-12)

    def residuals(self, z: torch.Tensor, atoms: int) -> list[float]:
        """Relative residuals (over ‖γ⊙C z‖) after 0, 1, …, ``atoms`` coordinate atoms; entry 0 is the plain
        (mask-free) span test."""
        z = z.double()
        target = self.atoms @ z
        scale = float((self.lifted @ z).norm())
        base = [self.shift[:, None]] if float(self.shift.norm()) > 0 else []
        chosen: list[int] = []
        out = []
        for step in range(atoms + 1):
            cols = torch.cat([*base, self.atoms[:, chosen]], dim=1)
            fit = cols @ torch.linalg.lstsq(cols, target[:, None]).solution if cols.shape[1] else None
            resid = target - fit[:, 0] if fit is not None else target
            out.append(float(resid.norm()) / scale)
            if step < atoms:
                corr = (self.atoms.T @ resid).abs() / self.atom_norms
                corr[chosen] = -1
                chosen.append(int(corr.argmax()))
        return out


def mask_atoms(d: int, p: float) -> int:
    """Coordinate atoms allowed: the mean dropped count p·d plus three standard deviations, rounded up."""
    return math.ceil(p * d + 3 * math.sqrt(d * p * (1 - p)))
