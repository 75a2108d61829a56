"""DP-SGD through Opacus, as a client-side hook on the local training step.

Each step: per-sample gradients g_i = ∇ℓ_i from Opacus's ``GradSampleModule``; Opacus's ``DPOptimizer``
clips each to C (g_i · min(1, C/‖g_i‖)), sums, adds N(0, σ²C²I) and divides by the batch size. ε for a
given δ comes from Opacus's RDP accountant over (σ, q, steps); q is the sampling rate of the batch in the
client's data (default 1: the batch is all of it) and steps the noisy steps behind the update (default:
the client's optimiser steps, filled in by :func:`defended_update`). With an ``epsilon`` target, σ comes
from ``opacus.accountants.utils.get_noise_multiplier``.

What works (Opacus 1.6, checked against per-sample autograd): Opacus's hooks have grad samplers for
``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``; layers without one (LlamaRMSNorm, GPT-2's Conv1D) fall
back to functorch per layer (``strict=False``), so ``mode="hooks"`` works on tiny-llama, tiny-gpt2 and
smollm2-135m (full model and LoRA adapters); ``mode="functorch"`` forces functorch for every layer and gives
the same gradients. Tied input/output embeddings accumulate both per-sample contributions. Rotary embeddings
have no parameters. Memory: per-sample gradients of every trainable parameter are materialised (B × model
size × 4 bytes, twice for a tied embedding), e.g. about 5 GB peak for full-model DP-SGD on smollm2-135m at
B = 2; DP-SGD on LoRA adapters is cheap. Positions are passed
as explicit (B, T) ids so GPT-2's learned position table gets per-sample gradients. Opacus records
activations only for modules in training mode, so without dropout only the leaf modules that own
parameters are switched to training mode (dropout is decided by their parents, which stay in eval mode).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from leaklab.core import option
from leaklab.defenses.base import DefenseConfig, Side
from leaklab.errors import LeaklabError
from leaklab.threat.local import Grads, Objective, trainable
from leaklab.threat.observation import Observation


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float | None:
    """ε of ``steps`` subsampled-Gaussian steps by Opacus's RDP accountant (None without noise)."""
    from opacus.accountants import RDPAccountant

    if noise_multiplier == 0:
        return None
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ that reaches (ε, δ) after ``steps`` steps at rate q (Opacus's search over its RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )
    )


@dataclass(frozen=True)
class DpSgd(DefenseConfig):
    """DP-SGD on the client: per-sample clipping to ``clip`` and Gaussian noise σ·clip (σ =
    ``noise_multiplier``, or calibrated from ``epsilon`` at ``delta``)."""

    clip: float = option(1.0, "per-sample L2 bound C (> 0)")
    noise_multiplier: float | None = option(None, "σ: noise N(0, σ²C²I) per step (or give epsilon)")
    epsilon: float | None = option(None, "target ε at delta: σ from the RDP accountant (or give noise_multiplier)")
    delta: float = option(1e-5, "δ of the accounting")
    sample_rate: float = option(1.0, "q: the batch's share of the client's data, in (0, 1]")
    steps: int | None = option(None, "noisy steps accounted (default: the client's optimiser steps)")
    mode: Literal["hooks", "functorch"] = option("hooks", "Opacus per-sample gradients: hooks or functorch")
    name: ClassVar[str] = "dpsgd"
    side: ClassVar[Side] = "client"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.epsilon is None):
            raise LeaklabError("dpsgd needs exactly one of noise_multiplier or epsilon")
        if not self.clip > 0:
            raise LeaklabError(f"dpsgd clip must be > 0, got {self.clip}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise LeaklabError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise LeaklabError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.sample_rate <= 1 or not 0 < self.delta < 1:
            raise LeaklabError("dpsgd needs 0 < sample_rate <= 1 and 0 < delta < 1")
        if self.steps is not None and self.steps < 1:
            raise LeaklabError(f"dpsgd steps must be >= 1, got {self.steps}")

    def sigma(self, steps: int) -> float:
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.epsilon is not None
        return noise_for_epsilon(self.epsilon, self.delta, self.sample_rate, self.steps or steps)

    # ------------------------------------------------------------------ ClientHook
    def prepare(self, model: nn.Module) -> None:
        return None

    def gradient(self, model: nn.Module, objective: Objective, seed: int) -> Grads:
        """(1/B)·(Σ_i clip_C(∇ℓ_i) + N(0, σ²C²I)) over the trainable parameters, via Opacus."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        params = trainable(model)
        sigma = self.sigma(self.steps or 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModule(model, loss_reduction="mean", strict=False, force_functorch=self.mode == "functorch")
            try:
                _train_parameter_leaves(model)
                objective.sample_losses(gsm).mean().backward()
                missing = [n for n, p in params.items() if getattr(p, "grad_sample", None) is None]
                if missing:
                    raise LeaklabError(
                        f"Opacus computed no per-sample gradient for {len(missing)} parameter(s) "
                        f"(first: {missing[0]}); try mode=functorch"
                    )
                opt = DPOptimizer(
                    torch.optim.SGD(list(params.values()), lr=0.0),
                    noise_multiplier=sigma,
                    max_grad_norm=self.clip,
                    expected_batch_size=objective.n,
                    loss_reduction="mean",
                    # on the parameters' device (Opacus draws the noise there); a seed's noise is per device
                    generator=torch.Generator(device=next(iter(params.values())).device).manual_seed(seed),
                )
                opt.pre_step()
                grads = {n: p.grad.detach().clone() for n, p in params.items()}
            finally:
                gsm._close()
                for p in params.values():
                    p.grad = None
        return grads

    # ------------------------------------------------------------------ records
    def record(self, steps: int = 1) -> dict[str, Any]:
        """σ as used by :meth:`gradient` and ε over the steps actually taken (unless ``steps`` was fixed)."""
        sigma = self.sigma(self.steps or 1)
        accounted = self.steps or steps
        return super().record(
            steps,
            noise_multiplier=sigma,
            epsilon=rdp_epsilon(sigma, self.sample_rate, accounted, self.delta),
            accounted_steps=accounted,
            accountant="opacus RDP",
            loss="mean over samples of each sample's mean loss",
        )

    def apply(self, obs: Observation, seed: int = 0) -> Observation:
        raise LeaklabError(
            f"dpsgd does not apply to an update already computed (setting {obs.setting}): DP-SGD clips and "
            "noises per-sample gradients, which a shared update no longer has. Pass it to the client "
            "(defended_update / 'update-setting --defense dpsgd')"
        )


def _train_parameter_leaves(model: nn.Module) -> None:
    """Opacus captures activations only in training mode; switching just the modules that own parameters
    keeps dropout (decided by their parents) as the caller set it."""
    for mod in model.modules():
        if next(mod.parameters(recurse=False), None) is not None:
            mod.training = True
