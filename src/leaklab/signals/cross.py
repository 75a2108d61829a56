"""Signal (c): do two vector sets come from the same model or corpus?

Paired rows (the same texts under two encoders): linear CKA, mutual-kNN overlap and an orthogonal Procrustes
residual on held-out rows, each beside a shuffled-rows null. Anchors only: Procrustes fitted on the anchor
pairs, then nearest-neighbour cosine of the mapped remaining rows. Unpaired: rotation-invariant spectrum
distance and a two-sample KS test on pairwise cosines.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ks_2samp

from leaklab.errors import LeaklabError
from leaklab.signals.fingerprint import _spectrum
from leaklab.signals.vectors import VectorSet, unit


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X, Y (Kornblith et al. 2019)."""
    x, y = x - x.mean(0), y - y.mean(0)
    num = np.linalg.norm(y.T @ x) ** 2
    return float(num / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's k nearest neighbours (cosine) in the two spaces."""

    def knn(z: np.ndarray) -> np.ndarray:
        s = unit(z) @ unit(z).T
        np.fill_diagonal(s, -np.inf)
        return np.argpartition(-s, k, axis=1)[:, :k]

    a, b = knn(x), knn(y)
    return float(np.mean([len(set(r) & set(q)) / k for r, q in zip(a, b, strict=True)]))


def _pad(x: np.ndarray, d: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, d - x.shape[1])))


def procrustes_residual(xa: np.ndarray, ya: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> float:
    """‖X_t R − Y_t‖_F / ‖Y_t‖_F with R orthogonal, fitted on (X_a, Y_a) (zero-padded)."""
    d = max(xa.shape[1], ya.shape[1])
    r, _ = orthogonal_procrustes(_pad(unit(xa), d), _pad(unit(ya), d))
    pred, true = _pad(unit(xt), d) @ r, _pad(unit(yt), d)
    return float(np.linalg.norm(pred - true) / np.linalg.norm(true))


def _paired(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> dict:
    n = len(a)
    perm = rng.permutation(n)
    fit, test = perm[: n // 2], perm[n // 2 :]
    k = max(1, min(10, n // 10))
    shuffled = b[rng.permutation(n)]
    out = {
        "cka": linear_cka(a, b),
        "cka_null": linear_cka(a, shuffled),
        "mutual_knn": mutual_knn(a, b, k),
        "mutual_knn_null": mutual_knn(a, shuffled, k),
        "procrustes_residual": procrustes_residual(a[fit], b[fit], a[test], b[test]),
        "procrustes_residual_null": procrustes_residual(a[fit], shuffled[fit], a[test], shuffled[test]),
    }
    out = {key: round(v, 4) for key, v in out.items()}
    if out["procrustes_residual"] < 0.05:
        out["verdict"] = "same model (the sets differ by a rotation at most)"
    elif out["cka"] > out["cka_null"] + 0.2 and out["mutual_knn"] > out["mutual_knn_null"] + 0.1:
        out["verdict"] = "same texts, different models (geometry agrees, no rotation maps one onto the other)"
    else:
        out["verdict"] = "unrelated (no more agreement than shuffled rows)"
    return out


def _anchors(a: np.ndarray, b: np.ndarray, anchors: int) -> dict:
    d = max(a.shape[1], b.shape[1])
    r, _ = orthogonal_procrustes(_pad(unit(a[:anchors]), d), _pad(unit(b[:anchors]), d))
    mapped = _pad(unit(a[anchors:]), d) @ r
    rest = _pad(unit(b[anchors:]), d)
    nn = (mapped @ rest.T).max(1)
    base = (_pad(unit(a[anchors:]), d) @ rest.T).max(1) if a.shape[1] == b.shape[1] else np.zeros(len(nn))
    out = {
        "anchors": anchors,
        "anchor_residual": round(
            float(
                np.linalg.norm(_pad(unit(a[:anchors]), d) @ r - _pad(unit(b[:anchors]), d))
                / np.linalg.norm(_pad(unit(b[:anchors]), d))
            ),
            4,
        ),
        "mapped_median_nn_cosine": round(float(np.median(nn)), 4),
        "mapped_share_nn_cos_0.99": round(float(np.mean(nn >= 0.99)), 4),
        "unmapped_median_nn_cosine": round(float(np.median(base)), 4),
    }
    if out["mapped_share_nn_cos_0.99"] > 0.5:
        out["verdict"] = "same model up to a rotation, and the sets share most documents"
    elif out["anchor_residual"] < 0.05:
        out["verdict"] = "same model up to a rotation (anchors fit exactly); different documents otherwise"
    else:
        out["verdict"] = "no rotation maps the anchors: different models or a non-orthogonal transform"
    return out


def _distribution_stats(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """(L1 distance of normalised covariance spectra, KS statistic of sampled pairwise cosines)."""
    k = min(32, len(a) - 1, len(b) - 1, a.shape[1], b.shape[1])

    def cosines(z: np.ndarray) -> np.ndarray:
        idx = rng.integers(len(z), size=(4000, 2))
        idx = idx[idx[:, 0] != idx[:, 1]]
        zu = unit(z)
        return np.sum(zu[idx[:, 0]] * zu[idx[:, 1]], axis=1)

    spec = float(np.abs(_spectrum(a, k) - _spectrum(b, k)).sum())
    return spec, float(ks_2samp(cosines(a), cosines(b)).statistic)


def _unpaired(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> dict:
    """Cross-set statistics against the within-set variability of random halves (each set's own baseline)."""
    if a.shape[1] != b.shape[1]:
        return {"dims": [int(a.shape[1]), int(b.shape[1])], "verdict": "different models (dimensions differ)"}
    spec, ks = _distribution_stats(a, b, rng)
    within = []
    for z in (a, b):
        perm = rng.permutation(len(z))
        within.append(_distribution_stats(z[perm[: len(z) // 2]], z[perm[len(z) // 2 :]], rng))
    ws, wk = max(w[0] for w in within), max(w[1] for w in within)
    out = {
        "dims": [int(a.shape[1])] * 2,
        "spectrum_l1": round(spec, 4),
        "spectrum_l1_within": round(ws, 4),
        "pairwise_cosine_ks": round(ks, 4),
        "pairwise_cosine_ks_within": round(wk, 4),
    }
    same = spec <= 2 * ws + 0.05 and ks <= 2 * wk + 0.05
    out["verdict"] = (
        "consistent with the same model and corpus (rotation-invariant statistics agree as well as "
        "random halves of each set do)"
        if same
        else "different model or corpus (spectrum or cosine distribution differs beyond the within-set spread)"
    )
    return out


def cross_source(a: VectorSet, b: VectorSet, mode: str = "auto", anchors: int = 0, seed: int = 0) -> dict:
    """Compare two vector sets; ``mode`` is paired, anchors, unpaired or auto (paired when ids match)."""
    rng = np.random.default_rng(seed)
    if mode == "auto":
        mode = "anchors" if anchors else ("paired" if a.ids and b.ids and a.ids == b.ids else "unpaired")
    if mode not in ("paired", "anchors", "unpaired"):
        raise LeaklabError(f"unknown mode '{mode}'; valid: auto, anchors, paired, unpaired")
    result: dict = {"mode": mode, "sizes": [len(a), len(b)]}
    if mode == "paired":
        if len(a) != len(b) or len(a) < 20:
            raise LeaklabError(f"paired mode needs two sets of the same size >= 20 (got {len(a)} and {len(b)})")
        result.update(_paired(a.vectors, b.vectors, rng))
    elif mode == "anchors":
        if not 2 <= anchors < min(len(a), len(b)):
            raise LeaklabError(f"--anchors must be in 2..{min(len(a), len(b)) - 1} (the first rows pair up)")
        result.update(_anchors(a.vectors, b.vectors, anchors))
    else:
        result.update(_unpaired(a.vectors, b.vectors, rng))
    return result
