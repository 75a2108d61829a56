"""Vector dumps on disk: .npy (n, d) or .jsonl rows {"embedding": [...], "text": ..., "id": ...}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leaklab.errors import LeaklabError
from leaklab.io import atomic_write, atomic_write_text

VECTOR_FIELDS = ("embedding", "vector")


@dataclass
class VectorSet:
    vectors: np.ndarray  # (n, d) float32
    texts: list[str] | None = None
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or len(self.vectors) == 0:
            raise LeaklabError(f"a vector set needs a non-empty (n, d) array (got shape {self.vectors.shape})")
        for name in ("texts", "ids"):
            col = getattr(self, name)
            if col is not None and len(col) != len(self.vectors):
                raise LeaklabError(f"{len(col)} {name} for {len(self.vectors)} vectors")

    def __len__(self) -> int:
        return len(self.vectors)


def load_vectors(path: str | Path) -> VectorSet:
    """Read a dump; malformed rows name their line and the expected fields."""
    p = Path(path)
    if not p.is_file():
        raise LeaklabError(f"vector file {p} not found")
    if p.suffix == ".npy":
        try:
            return VectorSet(np.load(p, allow_pickle=False))
        except ValueError as exc:
            raise LeaklabError(f"{p}: not a numeric .npy array ({exc})") from exc
    if p.suffix != ".jsonl":
        raise LeaklabError(f"{p}: vector dumps are .npy or .jsonl (got '{p.suffix}')")
    vecs, texts, ids = [], [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LeaklabError(f"{p}:{n}: not JSON ({exc.msg})") from exc
        field = next((f for f in VECTOR_FIELDS if isinstance(row, dict) and f in row), None)
        if field is None:
            raise LeaklabError(f"{p}:{n}: no 'embedding' (or 'vector') field")
        if vecs and len(row[field]) != len(vecs[0]):
            raise LeaklabError(f"{p}:{n}: vector has {len(row[field])} dimensions, earlier rows {len(vecs[0])}")
        vecs.append(row[field])
        texts.append(row.get("text"))
        ids.append(str(row.get("id", n - 1)))
    if not vecs:
        raise LeaklabError(f"{p}: no rows")
    has_text = all(t is not None for t in texts)
    return VectorSet(np.asarray(vecs, dtype=np.float32), texts if has_text else None, ids)


def save_vectors(path: str | Path, vs: VectorSet) -> Path:
    """Write .npy (vectors only) or .jsonl (with texts and ids), atomically."""
    p = Path(path)
    if p.suffix == ".npy":
        return atomic_write(p, lambda tmp: np.save(open(tmp, "wb"), vs.vectors))
    rows = []
    for i, v in enumerate(vs.vectors):
        row = {"id": vs.ids[i] if vs.ids else str(i), "embedding": [round(float(x), 7) for x in v]}
        if vs.texts is not None:
            row["text"] = vs.texts[i]
        rows.append(json.dumps(row))
    return atomic_write_text(p, "\n".join(rows) + "\n")


def unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1, n)
