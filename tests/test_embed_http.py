"""Embedding attacks through the HTTP client of a live leaklab service (OpenAI-style /v1/embeddings): the same
results as on the local encoder, and every query counted."""

from __future__ import annotations

import pytest

from leaklab.attacks.embedding.registry import Scenario
from leaklab.experiments.runner import run_embedding
from leaklab.service.process import ServerProcess, write_config
from leaklab.service.store import Store


def test_black_box_attacks_through_the_http_encoder_match_the_local_encoder(tmp_path):
    db = tmp_path / "svc.db"
    store = Store(db)
    key = store.create_key("attacker")[1]
    store.close()
    cfg = write_config(tmp_path / "cfg.json", {"limits": {"rate": 100000, "burst": 100000}})
    with ServerProcess("tiny-bert", db, cfg) as srv:
        for name, opts, metrics in (
            ("nearest", {"candidates": 30}, ("detect_recall", "absent_nearest_token_f1")),
            ("bow", {"augment": 0, "vocab": 300}, ("token_f1", "rougeL", "cosine")),
        ):
            url = f"{srv.url}#tiny-bert"  # the served model's name goes in the request's "model" field
            remote = run_embedding(name, Scenario(url, n=4, public_limit=60, api_key=key), opts)
            local = run_embedding(name, Scenario("tiny-bert", n=4, public_limit=60), opts)
            for metric in metrics:
                assert remote.aggregate[metric] == pytest.approx(local.aggregate[metric], abs=1e-6), (name, metric)
            assert remote.info["usage"]["queries"] == local.info["usage"]["queries"] > 0, (
                name
            )  # the public pairs, counted
            assert remote.info["usage"]["tokens"] > 0
        # the white-box attack needs gradients: through the HTTP encoder it could not run (the reason, no metrics)
        rec = run_embedding("whitebox", Scenario(url, n=2, api_key=key), {"max_tokens": 8, "vocab": 300})
        assert rec.status == "could_not_run" and rec.aggregate is None and rec.info == {}
        assert rec.reason.startswith(f"whitebox on '{url}': attack 'whitebox' needs white-box access")
