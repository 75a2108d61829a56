"""Signal (b): which known documents a leaked vector dump contains, and which encoder produced it."""

from __future__ import annotations

import numpy as np

from leaklab.signals.vectors import VectorSet, unit


def _spectrum(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k eigenvalues of the centred covariance, normalised to sum 1 (invariant to rotations)."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    s = s[:k] / max(s.sum(), 1e-12)
    return np.pad(s, (0, k - len(s)))


def fingerprint(leak: VectorSet, docs: list[str], encoders: dict[str, object], threshold: float = 0.99) -> dict:
    """For each candidate encoder: nearest known document of every leaked vector (cosine), documents present
    (cosine >= threshold) and a rotation-invariant spectrum distance; the best encoder is the best match."""
    x = unit(leak.vectors)
    rows = []
    best_present: list[dict] = []
    for name, enc in encoders.items():
        d = enc.embed(docs)
        row: dict = {"encoder": name, "dim": int(d.shape[1])}
        k = min(32, len(docs) - 1, len(x) - 1) if min(len(docs), len(x)) > 2 else 1
        row["spectrum_l1"] = round(float(np.abs(_spectrum(x, k) - _spectrum(d, k)).sum()), 4)
        if d.shape[1] != x.shape[1]:
            row.update(
                {
                    "match_share": 0.0,
                    "median_nn_cosine": None,
                    "note": f"dimension {d.shape[1]} != {x.shape[1]}",
                }
            )
        else:
            sims = x @ unit(d).T
            nn = sims.argmax(1)
            nn_cos = sims[np.arange(len(x)), nn]
            present = nn_cos >= threshold
            row.update(
                {
                    "match_share": round(float(present.mean()), 4),
                    "median_nn_cosine": round(float(np.median(nn_cos)), 4),
                }
            )
            row["_present"] = [
                {
                    "vector": leak.ids[i] if leak.ids else i,
                    "doc": int(nn[i]),
                    "cosine": round(float(nn_cos[i]), 5),
                    "text": docs[int(nn[i])][:120],
                }
                for i in np.flatnonzero(present)
            ]
        rows.append(row)
    rows.sort(key=lambda r: (-r["match_share"], r["spectrum_l1"]))
    best = rows[0]
    best_present = best.pop("_present", [])
    for r in rows:
        r.pop("_present", None)
    if best["match_share"] > 0:
        share = best["match_share"]
        verdict = f"{best['encoder']} produced {share:.0%} of the leaked vectors (exact document matches)"
    else:
        verdict = (
            f"no candidate reproduces the vectors directly (rotated, noised or another encoder); closest "
            f"geometry: {min(rows, key=lambda r: r['spectrum_l1'])['encoder']}"
        )
    return {
        "vectors": len(x),
        "documents": len(docs),
        "threshold": threshold,
        "encoders": rows,
        "verdict": verdict,
        "present": best_present,
        "present_count": len(best_present),
    }
