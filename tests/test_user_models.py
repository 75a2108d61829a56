"""Models a user holds: a GGUF file given by path as --model, and an encoder folder served by `leaklab serve`."""

from __future__ import annotations

import httpx
import pytest

from leaklab.experiments.runner import attack_batch
from leaklab.models import ModelRef
from leaklab.service.process import ServerProcess
from leaklab.service.store import Store
from leaklab.threat.fedsgd import fedsgd_update


@pytest.mark.real
def test_packaged_gguf_by_path_recovers_a_b2_batch_exactly(tmp_path, monkeypatch):
    """The packaged SmolLM2 GGUF file, given by path, converts once into the cache and gives up B=2 exactly."""
    from leaklab.models.registry import SMOLLM2_GGUF, _smollm2_dir, clear_loaded

    monkeypatch.setenv("LEAKLAB_CACHE", str(tmp_path / "cache"))
    path = str(_smollm2_dir() / SMOLLM2_GGUF)
    texts = ["The rain kept falling on the old stone bridge.", "She opened the window and smiled at the sea."]
    obs, secret = fedsgd_update(ModelRef(path), texts)
    record = attack_batch("dager", obs, secret)
    assert record.status == "recovered" and record.aggregate["rouge1"] == 1.0, record.recovered
    converted = list((tmp_path / "cache" / "models").glob("gguf-*"))
    assert len(converted) == 1 and (converted[0] / "tokenizer_config.json").exists()
    clear_loaded()


def test_gguf_path_that_does_not_exist_is_one_line(tmp_path):
    from leaklab.errors import LeaklabError
    from leaklab.models import load_model

    with pytest.raises(LeaklabError, match=r"GGUF file .* not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_serve_an_encoder_folder_answers(tmp_path):
    """`leaklab serve --encoder FOLDER` (a sentence-transformers folder) on 127.0.0.1 answers an embeddings request."""
    from leaklab.models.registry import minilm_dir

    db = tmp_path / "svc.db"
    store = Store(db)
    key = store.create_key("user")[1]
    store.close()
    folder = str(minilm_dir())
    with ServerProcess(folder, db, None) as srv:
        res = httpx.post(
            f"{srv.url}/v1/embeddings",
            json={"input": ["hello world", "a second text"]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
    assert res.status_code == 200, res.text
    body = res.json()
    assert [len(row["embedding"]) for row in body["data"]] == [384, 384]
    assert body["model"] == minilm_dir().name
    assert srv.proc is not None and srv.proc.poll() is not None  # the server was stopped
