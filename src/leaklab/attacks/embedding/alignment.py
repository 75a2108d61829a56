"""Known-plaintext alignment (ALGEN idea): from k leaked (text, victim vector) pairs, map the victim's space
onto a local encoder's space, then run the local attacks through the map.

- Procrustes: W = argmin_{WᵀW=I} ||X W − Y||_F = U Vᵀ with U Σ Vᵀ = SVD(Xᵀ Y) (needs equal dimensions).
- ridge: W = (XᵀX + λI)⁻¹ Xᵀ Y (any dimensions; λ scaled by trace(XᵀX)/d).
X: victim vectors of the leaked texts, Y: the local encoder's vectors of the same texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from leaklab.attacks.embedding.access import Access, Prediction, PublicData
from leaklab.attacks.embedding.bow import BowTraining, train_bow
from leaklab.attacks.embedding.decoder import DecoderTraining, train_decoder
from leaklab.attacks.embedding.nearest import NearestNeighbour
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, sub_config
from leaklab.attacks.embedding.whitebox import WhiteBoxInverter
from leaklab.core import option
from leaklab.encoders import Encoder, cached_embed, check_texts, check_vectors
from leaklab.errors import LeaklabError, UnknownNameError

METHODS = ("procrustes", "ridge")


class Alignment:
    """A linear map from victim vectors to local-encoder vectors, fitted on k leaked pairs."""

    def __init__(self, method: str = "procrustes", ridge: float = 1e-2) -> None:
        if method not in METHODS:
            raise UnknownNameError("alignment method", method, list(METHODS))
        self.method, self.ridge = method, ridge
        self.matrix: np.ndarray | None = None

    def fit(self, victim: np.ndarray, local: np.ndarray) -> Alignment:
        x = check_vectors(victim, np.shape(victim)[-1], "leaked victim vectors")
        y = check_vectors(local, np.shape(local)[-1], "local vectors")
        if len(x) != len(y):
            raise LeaklabError(f"{len(x)} victim vectors but {len(y)} local vectors of the leaked texts")
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if self.method == "procrustes":
            if x.shape[1] != y.shape[1]:
                raise LeaklabError(
                    f"Procrustes needs equal dimensions (victim {x.shape[1]}, local {y.shape[1]}); use --method ridge"
                )
            from scipy.linalg import orthogonal_procrustes

            self.matrix, _ = orthogonal_procrustes(x64, y64)
        else:
            gram = x64.T @ x64
            lam = self.ridge * np.trace(gram) / gram.shape[0]
            self.matrix = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x64.T @ y64)
        return self

    def transform(self, victim: np.ndarray) -> np.ndarray:
        if self.matrix is None:
            raise LeaklabError("alignment is not fitted")
        x = check_vectors(victim, self.matrix.shape[0], "victim vectors")
        out = x.astype(np.float64) @ self.matrix
        return (out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


def leaked_pairs(victim: Encoder, texts: list[str], k: int) -> tuple[list[str], np.ndarray]:
    """The first k (text, victim vector) pairs the attacker holds; asking for more than exist is an error."""
    if k < 1:
        raise LeaklabError(f"k must be >= 1, got {k}")
    texts = check_texts(texts, "leaked pairs")
    if k > len(texts):
        raise LeaklabError(f"k={k} leaked pairs requested but only {len(texts)} are available")
    return texts[:k], victim.embed(texts[:k])


def parse_ks(value: str) -> list[int]:
    """The k sweep of option ``k``: comma-separated whole numbers ≥ 1 (one clear error otherwise)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise LeaklabError(f"option k must be comma-separated whole numbers >= 1 (e.g. 8,32,128), got '{value}'")
    return [int(p) for p in parts]


@dataclass(frozen=True)
class AlignmentConfig(BowTraining):
    """Options of the alignment attack; the bag-of-words fields train its inner ``bow`` attack."""

    k: str = option("16,64,256,1024", "leaked pairs: comma-separated sweep of k")
    method: Literal["procrustes", "ridge"] = option("procrustes", "the linear map fitted on the leaked pairs")
    ridge: float = option(1e-2, "method=ridge: λ, scaled by trace(XᵀX)/d")
    inner: tuple[Literal["nearest", "bow", "decoder", "whitebox"], ...] = option(
        ("nearest", "bow"), "local attacks run through the map (comma-separated)"
    )
    local: str | None = option(None, "the attacker's local encoder (default: the scenario's)")
    victim: str | None = option(None, "the victim's encoder (default: the scenario's, secretly rotated)")
    transform: Literal["rotation", "none"] = option("rotation", "secret transform of the victim's space")
    noise: float = option(0.0, "transform=rotation: noise added to the victim's vectors")
    steps: int = option(1, "inner decoder: correction rounds")
    wb_passes: int = option(2, "inner whitebox: coordinate passes")
    decoder: tuple[str, ...] = option(
        (), "inner decoder: training options as key=value pairs, e.g. decoder=arch=gru,vocab=2000"
    )

    def __post_init__(self) -> None:
        parse_ks(self.k)
        self.decoder_training()

    @property
    def ks(self) -> list[int]:
        return parse_ks(self.k)

    def decoder_training(self) -> DecoderTraining:
        """The inner decoder's training options (option ``decoder``)."""
        return DecoderTraining.from_pairs(self.decoder, "alignment's inner decoder")


def _inner_attack(
    name: str, public: PublicData, cfg: AlignmentConfig, local: Encoder, mapped: np.ndarray, cache: dict[str, Any]
) -> list[str]:
    """A local attack (trained / built on the local encoder's public pairs) on mapped vectors."""
    if name == "nearest":
        if "nn" not in cache:
            texts, vecs = public.pairs(local)
            cache["nn"] = NearestNeighbour(local, texts, candidate_vectors=vecs)
        return cache["nn"].run(mapped).texts
    if name == "bow":
        if "bow" not in cache:
            cache["bow"] = train_bow(public, sub_config(BowTraining, cfg), local)[0]
        return cache["bow"].invert(mapped)
    if name == "decoder":
        if "dec" not in cache:
            cache["dec"] = train_decoder(public, cfg.decoder_training(), local)[0]
        return cache["dec"].invert(mapped, local, steps=cfg.steps)
    return WhiteBoxInverter(local, passes=cfg.wb_passes).invert(mapped)[0]


ACCESS = "k leaked (text, vector) pairs + leaked vectors + a local encoder"


@EMBED_ATTACKS.register("alignment", config=AlignmentConfig, access=ACCESS, case="alignment")
def attack(access: Access, public: PublicData, cfg: AlignmentConfig) -> Prediction:
    """Procrustes/ridge map from k leaked pairs, then local attacks through it (one recovery per k and inner
    attack, named ``k=<k>/<inner>``; the mapped vectors per k, named ``k=<k>``)."""
    leaked, pairs, local = access.need("vectors"), access.need("pairs"), access.need("reference")
    leaked_local = cached_embed(local, pairs.texts)
    variants: dict[str, list[str]] = {}
    mapped_of: dict[str, np.ndarray] = {}
    cache: dict[str, Any] = {}
    for k in cfg.ks:
        mapped = Alignment(cfg.method, cfg.ridge).fit(pairs.vectors[:k], leaked_local[:k]).transform(leaked.vectors)
        mapped_of[f"k={k}"] = mapped
        for name in cfg.inner:
            variants[f"k={k}/{name}"] = _inner_attack(name, public, cfg, local, mapped, cache)
    return Prediction(
        variants=variants,
        vectors=mapped_of,
        measures={"method": cfg.method, "victim": leaked.encoder, "local": local.name},
        notes={
            "leaked_pairs": "private texts disjoint from the targets",
            "inner_attacks": list(cfg.inner),
            "victim_queries": "none: only the leaked pairs and vectors",
        },
    )
