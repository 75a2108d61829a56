"""Signal (a): vectors repeated (within a tolerance) across different texts, with the likely cause."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

from leaklab.errors import LeaklabError
from leaklab.signals.vectors import VectorSet, unit

CAUSES = (
    "normalisation",
    "truncation",
    "unknown-token collapse",
    "tokenizer normalisation",
    "caching",
    "near-collision",
)


def normalise_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def candidate_pairs(x: np.ndarray, tables: int = 6, bits: int = 16, seed: int = 0) -> set[tuple[int, int]]:
    """Pairs sharing a SimHash bucket in any of ``tables`` tables of ``bits`` hyperplanes (cosine LSH)."""
    rng = np.random.default_rng(seed)
    pairs: set[tuple[int, int]] = set()
    for _ in range(tables):
        planes = rng.standard_normal((x.shape[1], bits)).astype(np.float32)
        codes = (x @ planes > 0) @ (1 << np.arange(bits, dtype=np.int64))
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        bounds = np.flatnonzero(np.diff(sorted_codes)) + 1
        for group in np.split(order, bounds):
            if 1 < len(group) <= 2000:
                g = np.sort(group)
                pairs.update((int(a), int(b)) for i, a in enumerate(g) for b in g[i + 1 :])
    return pairs


@dataclass(frozen=True)
class Collision:
    i: int
    j: int
    cosine: float
    cause: str
    detail: str


def classify(a: str, b: str, va: np.ndarray, vb: np.ndarray, tokenizer, max_seq_len: int | None) -> tuple[str, str]:
    """Most specific explanation of why two different texts got (nearly) the same vector."""
    if normalise_text(a) == normalise_text(b):
        return "normalisation", "texts equal after NFKC + case folding + whitespace collapse"
    if tokenizer is not None:
        ia = tokenizer(a, add_special_tokens=False)["input_ids"]
        ib = tokenizer(b, add_special_tokens=False)["input_ids"]
        if max_seq_len:
            room = max_seq_len - 2  # [CLS] and [SEP]
            if len(ia) >= room and len(ib) >= room and ia[:room] == ib[:room]:
                return (
                    "truncation",
                    f"both exceed {room} tokens and agree on the first {room} (max_seq_len {max_seq_len})",
                )
        if ia == ib:
            unk = getattr(tokenizer, "unk_token_id", None)
            if unk is not None and unk in ia:
                return (
                    "unknown-token collapse",
                    f"same token ids; {ia.count(unk)} unknown token(s) absorb the difference",
                )
            return (
                "tokenizer normalisation",
                "same token ids (the tokenizer lower-cases or strips accents/symbols)",
            )
    if np.array_equal(va, vb):
        return "caching", "bit-identical vectors for different token sequences (a cache keyed too coarsely?)"
    return "near-collision", "different tokens, near-identical vectors (adversarial or degenerate input)"


def repeated_embeddings(
    vs: VectorSet, tol: float = 1e-4, tokenizer=None, max_seq_len: int | None = None, max_report: int = 200
) -> dict:
    """Pairs with cosine >= 1 − tol whose raw texts differ, by cause (SimHash LSH candidates)."""
    if vs.texts is None:
        raise LeaklabError("the repeated-embedding signal needs the texts beside the vectors (.jsonl with 'text')")
    if not 0 <= tol < 1:
        raise LeaklabError(f"tolerance must be in [0, 1) (got {tol})")
    x = unit(vs.vectors)
    found: list[Collision] = []
    for i, j in sorted(candidate_pairs(x)):
        if vs.texts[i] == vs.texts[j]:
            continue
        c = float(x[i] @ x[j])
        if c >= 1 - tol:
            cause, detail = classify(vs.texts[i], vs.texts[j], vs.vectors[i], vs.vectors[j], tokenizer, max_seq_len)
            found.append(Collision(i, j, c, cause, detail))
    counts = {c: sum(f.cause == c for f in found) for c in CAUSES}
    examples = [
        {
            "a": vs.texts[f.i][:160],
            "b": vs.texts[f.j][:160],
            "ids": [vs.ids[f.i] if vs.ids else f.i, vs.ids[f.j] if vs.ids else f.j],
            "cosine": round(f.cosine, 6),
            "cause": f.cause,
            "detail": f.detail,
        }
        for f in found[:max_report]
    ]
    return {
        "vectors": len(vs),
        "tolerance": tol,
        "pairs": len(found),
        "by_cause": counts,
        "examples": examples,
    }


def repeated_in_log(db) -> dict:
    """From a service query log (hashes only): returned vectors bit-identical across different texts.

    Deterministic defenses keep such repeats; fresh noise never repeats, so a repeat under a noise defense
    points at a cache that serves stored vectors for new inputs."""
    from leaklab.service.store import Store

    store = Store(db)
    try:
        with store.lock:
            rows = store.conn.execute(
                "SELECT vector_hash, defense, COUNT(DISTINCT text_hash), COUNT(*), "
                "GROUP_CONCAT(DISTINCT key_id) "
                "FROM queries WHERE route='embeddings' GROUP BY vector_hash, defense "
                "HAVING COUNT(DISTINCT text_hash) > 1 ORDER BY COUNT(DISTINCT text_hash) DESC"
            ).fetchall()
    finally:
        store.close()
    groups = [
        {
            "vector_hash": v,
            "defense": d,
            "distinct_texts": n,
            "responses": c,
            "keys": (k or "").split(","),
            "likely_cause": "caching (noise defense, yet identical vectors)"
            if ("gaussian" in d or "metric-dp" in d)
            else "texts the encoder maps identically (case, truncation, unknown tokens): check the texts",
        }
        for v, d, n, c, k in rows
    ]
    return {"groups": len(groups), "examples": groups[:200]}
