"""Toy black-box encoders for embedding-attack tests (exact maths, no model)."""

import numpy as np

from leaklab.encoders import CallableEncoder
from leaklab.metrics.embedding import words


def bag_encoder(vocab: list[str]) -> CallableEncoder:
    """e(x) = normalised word-count vector over ``vocab``: the exact bag maximises the cosine."""
    index = {w: i for i, w in enumerate(vocab)}

    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(vocab)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in words(t):
                if w in index:
                    out[r, index[w]] += 1
        out[:, -1] += 1e-3  # keep empty texts finite
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return CallableEncoder(embed, dim=len(vocab), name="toy-bag")
