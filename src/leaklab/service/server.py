"""Assemble the app from names and files (used by `leaklab serve` and the tests)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from leaklab.service.app import build_index, create_app
from leaklab.service.config import load_config
from leaklab.service.encoders import load_encoder
from leaklab.service.store import Store


def build_app(model: str, db: str | Path, config: str | Path | None) -> FastAPI:
    """Encoder by name, config file, SQLite store and the document index of ``search.corpus``."""
    cfg = load_config(config)
    encoder = load_encoder(model)
    store = Store(db, cfg.durability)
    index = build_index(encoder, cfg.search.corpus, cfg.search.limit)
    return create_app(cfg, store, encoder, index)
