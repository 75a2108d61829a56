"""Sentence encoders the service serves: the packaged MiniLM, a tiny random BERT, a fast hashing encoder, or
any sentence-transformers / Hugging Face encoder folder (its own pooling and normalisation when it says so).

Each is a :class:`leaklab.encoders.CallableEncoder` (the attacks' encoder type) with the model's tokenizer
(token counts: special tokens, no truncation), its input limit and unit-length output.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import cache

import numpy as np

from leaklab.encoders import CallableEncoder, Encoder
from leaklab.errors import UnknownNameError


def served(name: str, dim: int, max_seq_len: int, tokenizer: object, fn: Callable[[list[str]], np.ndarray]) -> Encoder:
    """An encoder as the service serves it: ``fn`` on each request's texts at once, rows at unit length."""
    return CallableEncoder(fn, dim, name, None, tokenizer, max_seq_len, normalize=True)


def _minilm() -> Encoder:
    from sentence_transformers import SentenceTransformer

    from leaklab.models.device import current_device
    from leaklab.models.registry import minilm_dir

    st = SentenceTransformer(str(minilm_dir()), device=str(current_device()))
    return served(
        "minilm-l6",
        int(st.get_embedding_dimension()),
        int(st.max_seq_length),
        st.tokenizer,
        lambda texts: st.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False),
    )


def _tiny_bert() -> Encoder:
    """Mean pooling over the last hidden states of the packaged 2-layer random-init BERT (d=128)."""
    import torch

    from leaklab.models import load_model

    loaded = load_model("tiny-bert", task="classify")
    model, tok = loaded.model, loaded.tokenizer
    base = getattr(model, model.base_model_prefix, model)

    def embed(texts: list[str]) -> np.ndarray:
        batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            hidden = base(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()

    return served("tiny-bert", int(base.config.hidden_size), 128, tok, embed)


def _hashing(dim: int = 128, max_seq_len: int = 128) -> Encoder:
    """Bag of unigrams and bigrams over MiniLM WordPiece ids, each hashed to a fixed random Gaussian vector,
    truncated at ``max_seq_len`` - 2 tokens (room for [CLS]/[SEP], as BERT): fast and order-aware."""
    from leaklab.models.registry import minilm_tokenizer

    tok = minilm_tokenizer()
    rng = np.random.default_rng(20240601)
    table = rng.standard_normal((len(tok), dim)).astype(np.float32)
    bigram = rng.standard_normal((4096, dim)).astype(np.float32) * 0.5

    def embed(texts: list[str]) -> np.ndarray:
        enc = tok(texts, add_special_tokens=False, truncation=True, max_length=max_seq_len - 2)["input_ids"]
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for i, ids in enumerate(enc):
            if not ids:
                continue
            out[i] = table[ids].sum(0)
            if len(ids) > 1:
                a = np.asarray(ids[:-1], dtype=np.int64)
                b = np.asarray(ids[1:], dtype=np.int64)
                out[i] += bigram[(a * 1000003 + b) % 4096].sum(0)
        return out

    return served("hashing", dim, max_seq_len, tok, embed)


ENCODERS: dict[str, tuple[str, Callable[[], Encoder]]] = {
    "minilm-l6": ("all-MiniLM-L6-v2 via sentence-transformers (d=384, max 256 tokens)", _minilm),
    "tiny-bert": ("2-layer random-init BERT, mean pooling (d=128); fast tests", _tiny_bert),
    "hashing": (
        "hashed WordPiece unigram+bigram encoder (d=128, max 128 tokens); fastest, for load tests",
        _hashing,
    ),
}


def encoder_names() -> list[str]:
    return list(ENCODERS)


def _folder(path: str) -> Encoder:
    """A sentence-transformers or Hugging Face encoder folder, pooled as its folder says (mean by default)."""
    from pathlib import Path

    from leaklab.encoders import load_encoder as load_local

    local = load_local(path, fresh=True)
    name = Path(os.path.expanduser(path)).resolve().name
    return served(name, local.dim, local.max_seq_len, local.tokenizer, local.embed)


@cache
def load_encoder(name: str) -> Encoder:
    """The encoder registered as ``name``, or an encoder folder (memoised)."""
    if name in ENCODERS:
        return ENCODERS[name][1]()
    if os.path.isdir(os.path.expanduser(name)):
        return _folder(name)
    raise UnknownNameError("encoder", name, encoder_names(), "or a sentence-transformers / Hugging Face encoder folder")


def vector_hash(vec: np.ndarray) -> str:
    """SHA-256 (first 16 hex) of the float32 bytes of a vector: equal hashes mean bit-identical responses."""
    return hashlib.sha256(np.ascontiguousarray(vec, dtype=np.float32).tobytes()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
