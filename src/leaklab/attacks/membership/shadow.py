"""RMIA (Zubair et al., ICML 2024), offline: shadow (reference) models are fine-tuned from the base model on
disjoint public texts, so no candidate is in any of them (OUT models).

Pr(x | θ) = exp(−mean token NLL). With K OUT models, Pr(x) ≈ ½((1 + a)·mean_k Pr(x | θ_k) + (1 − a)), and
LR(x) = Pr(x | θ_target) / Pr(x). The score is the share of population texts z (public, in no shadow's
training set) with LR(x) / LR(z) > γ.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from leaklab.attacks.base import CannotRun
from leaklab.attacks.membership.access import LMAccess
from leaklab.attacks.membership.registry import MEMBERSHIP_ATTACKS
from leaklab.core import Config, option
from leaklab.errors import LeaklabError
from leaklab.models.causal import CausalLM, load_causal_lm


@dataclass(frozen=True)
class RmiaOptions(Config):
    """Options of RMIA with shadow LoRA fine-tunes on public data."""

    shadows: int = option(2, "shadow models, each fine-tuned from the base model on its own public texts")
    shadow_texts: int = option(250, "public texts each shadow is fine-tuned on")
    population: int = option(200, "public texts in no shadow's training set: RMIA's population z")
    method: Literal["full", "lora"] = option("lora", "shadow fine-tuning: full or LoRA")
    epochs: int = option(3, "shadow fine-tuning epochs")
    lr: float | None = option(None, "shadow learning rate (default: 5e-5 full, 1e-3 LoRA)")
    a: float = option(0.3, "offline correction a in Pr(x) ≈ ½((1+a)·Pr_OUT(x) + (1−a)), in [0, 1]")
    gamma: float = option(1.0, "likelihood-ratio margin γ (> 0)")
    seed: int = option(0, "seed of the public split and of shadow training")

    def __post_init__(self) -> None:
        self.require(positive=("shadows", "shadow_texts", "population", "epochs", "gamma"))
        if not 0 <= self.a <= 1:
            raise LeaklabError(f"a must be in [0, 1], got {self.a}")


def split_public(public: Sequence[str], cfg: RmiaOptions) -> tuple[list[str], list[list[str]]]:
    """(population, one disjoint training set per shadow) from a seeded permutation of the public texts."""
    need = cfg.population + cfg.shadows * cfg.shadow_texts
    if len(public) < need:
        raise CannotRun(
            f"rmia needs {need} public texts ({cfg.population} population + {cfg.shadows}×{cfg.shadow_texts} "
            f"shadow training), got {len(public)}"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(public))
    texts = [public[i] for i in order]
    train = [
        texts[cfg.population + i * cfg.shadow_texts : cfg.population + (i + 1) * cfg.shadow_texts]
        for i in range(cfg.shadows)
    ]
    return texts[: cfg.population], train


def _shadow_key(base: CausalLM, texts: Sequence[str], cfg: RmiaOptions, i: int) -> str:
    blob = json.dumps([base.name, list(texts), cfg.to_dict(), i], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def shadow_model(access: LMAccess, base: CausalLM, texts: Sequence[str], cfg: RmiaOptions, i: int) -> CausalLM:
    """Shadow ``i``: the base fine-tuned on ``texts`` (cached in ``access.shadow_dir`` when set)."""
    from leaklab.threat.finetune import TrainOptions, save_causal_lm, train_causal_lm

    key = _shadow_key(base, texts, cfg, i)
    if key in access._models:
        return access._models[key]
    folder = access.shadow_dir / f"shadow-{key}" if access.shadow_dir is not None else None
    if folder is not None and folder.is_dir():
        lm = load_causal_lm(str(folder))
    else:
        opts = TrainOptions(method=cfg.method, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed + 1000 * (i + 1))
        fresh = CausalLM(base.name, copy.deepcopy(base.model), base.tokenizer)
        model, record = train_causal_lm(fresh, texts, opts)
        lm = CausalLM(f"shadow {i}", model, base.tokenizer)
        if folder is not None:
            save_causal_lm(model, base.tokenizer, Path(folder), {"shadow": i, "options": cfg.to_dict(), **record})
    access._models[key] = lm
    return lm


def _probability(access: LMAccess, lm: CausalLM, texts: Sequence[str]) -> np.ndarray:
    return np.exp([-s.loss for s in access.stats(lm, texts)])


def rmia_scores(
    p_target: np.ndarray, p_shadows: np.ndarray, z_target: np.ndarray, z_shadows: np.ndarray, a: float, gamma: float
) -> np.ndarray:
    """Share of population z with LR(x)/LR(z) > γ; p_* are (texts,) and (shadows, texts) probabilities."""

    def ratio(pt: np.ndarray, ps: np.ndarray) -> np.ndarray:
        return pt / (0.5 * ((1 + a) * ps.mean(0) + (1 - a)))

    lr_x, lr_z = ratio(p_target, p_shadows), ratio(z_target, z_shadows)
    return (lr_x[:, None] / lr_z[None, :] > gamma).mean(1)


@MEMBERSHIP_ATTACKS.register("rmia", config=RmiaOptions, needs=("base", "public"))
def rmia_attack(access: LMAccess, texts: Sequence[str], cfg: RmiaOptions) -> np.ndarray:
    """RMIA: the target's likelihood ratio against shadow fine-tunes, compared with a public population."""
    base = access.need_base("rmia")
    population, train = split_public(access.need_public("rmia"), cfg)
    shadows = [shadow_model(access, base, t, cfg, i) for i, t in enumerate(train)]
    return rmia_scores(
        _probability(access, access.target, texts),
        np.stack([_probability(access, s, texts) for s in shadows]),
        _probability(access, access.target, population),
        np.stack([_probability(access, s, population) for s in shadows]),
        cfg.a,
        cfg.gamma,
    )
