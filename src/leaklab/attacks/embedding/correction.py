"""Correction by re-embedding (vec2text's idea, without a second model), shared by the GRU and LM decoders.

Each round re-embeds the hypotheses h (black-box queries, counted), decodes again from the pushed target
u = v + α (v − φ(h)), tries dropping each word (and ``edits`` word substitutions and insertions); the
``beam`` hypotheses closest to v (cosine) survive.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from leaklab.encoders import Encoder, check_vectors
from leaklab.metrics.embedding import cosine_rows


class CorrectingInverter:
    """Beam-search hypotheses, then correction by re-embedding (shared by the GRU and LM decoders)."""

    def beam_search(self, vectors: np.ndarray, beam: int = 4) -> list[list[str]]:  # pragma: no cover
        raise NotImplementedError

    def invert(
        self,
        vectors: np.ndarray,
        encoder: Encoder | None = None,
        steps: int = 3,
        beam: int = 4,
        alpha: float = 1.0,
        seeds: list[list[str]] | None = None,
        edits: int = 0,
    ) -> list[str]:
        """Best beam hypothesis, then ``steps`` rounds of correction by re-embedding through ``encoder``
        (``seeds``: extra starting hypotheses per vector, e.g. its nearest public texts; ``edits``: word
        substitutions tried per round on the best hypothesis)."""
        v = check_vectors(vectors, self.dim, "target vectors")
        hyps = self.beam_search(v, beam)
        if encoder is None or steps <= 0:
            return [h[0] for h in hyps]
        if seeds is not None:
            hyps = [h + list(s) for h, s in zip(hyps, seeds, strict=True)]
        return [self._correct(v[i], hyps[i], encoder, steps, beam, alpha, edits) for i in range(len(v))]

    def _correct(
        self, v: np.ndarray, first: list[str], encoder: Encoder, steps: int, beam: int, alpha: float, edits: int = 0
    ) -> str:
        scored: dict[str, float] = {}

        def score(cands: list[str]) -> None:
            new = list(dict.fromkeys(c for c in cands if c.strip() and c not in scored))
            if new:
                sims = cosine_rows(encoder.embed(new), np.repeat(v[None], len(new), 0))
                scored.update(zip(new, sims.tolist(), strict=True))

        score(first)
        for _ in range(steps):
            best = sorted(scored, key=lambda t: -scored[t])[:beam]
            emb = encoder.embed(best)
            pushed = v[None] + alpha * (v[None] - emb)
            cands = [h for row in self.beam_search(pushed.astype(np.float32), beam) for h in row]
            for b in best:
                w = b.split()
                cands.extend(" ".join(w[:i] + w[i + 1 :]) for i in range(len(w)) if len(w) > 1)
            cands.extend(substitutions(best[0], first + cands, edits, insert=True))
            before = len(scored)
            score(cands)
            if len(scored) == before:
                break
        return max(scored, key=lambda t: scored[t])


def substitutions(text: str, pool_texts: list[str], limit: int, insert: bool = False) -> list[str]:
    """Up to ``limit`` one-word substitutions (and, with ``insert``, insertions) of ``text`` with words of
    ``pool_texts``, most frequent pool word first."""
    if limit <= 0:
        return []
    words = text.split()
    pool = [w for w, _ in Counter(w for t in pool_texts for w in dict.fromkeys(t.split())).most_common()]
    out = []
    for new in pool:
        for i in range(len(words) + insert):
            if i < len(words) and new != words[i]:
                out.append(" ".join(words[:i] + [new] + words[i + 1 :]))
            if insert:
                out.append(" ".join(words[:i] + [new] + words[i:]))
            if len(out) >= limit:
                return out[:limit]
    return out
