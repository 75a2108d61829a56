"""--device / LEAKLAB_DEVICE: one resolver, one-line refusals, models and run tensors on the chosen device."""

from __future__ import annotations

import sys

import pytest
import torch
from device_guard import unplaced_tensors_fail

from leaklab.errors import LeaklabError
from leaklab.models import ModelRef, load_model
from leaklab.models.device import ENV, chunk_rows, device_record, resolve_device, use_device


def test_resolver_explicit_auto_env_and_refusals(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(LeaklabError, match="CUDA is not available") as err:
            resolve_device(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(LeaklabError, match="valid: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(LeaklabError, match="'cuda'"):
        resolve_device(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LeaklabError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_chunk_rows_follow_free_memory(monkeypatch):
    from leaklab.models import device

    monkeypatch.setattr(device, "free_memory_bytes", lambda _dev: 4 * 2**20)
    cpu = torch.device("cpu")
    assert chunk_rows(1024, cpu) == 1024  # a quarter of 4 MiB in 1 KiB rows
    assert chunk_rows(1024, cpu, most=100) == 100
    assert chunk_rows(2**40, cpu) == 1


def _main(monkeypatch, capsys, *args):
    from leaklab.cli.main import main
    from leaklab.models import device

    monkeypatch.setenv(ENV, "auto")  # --device is passed on through the environment: restored after the test
    monkeypatch.setitem(device._CHOSEN, "device", None)
    monkeypatch.setattr(sys, "argv", ["leaklab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_device_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _main(monkeypatch, capsys, "gradient", "attack", "--device", "cuda", "--model", "tiny-llama")
    assert code == 2
    assert err.strip().count("\n") == 0 and "CUDA is not available" in err


def test_cli_device_cpu_explicit_records_the_device(monkeypatch, capsys, tmp_path):
    import json

    corpus = tmp_path / "private.txt"
    words = [
        "cat",
        "river",
        "roof",
        "lamp",
        "garden",
        "window",
        "bridge",
        "candle",
        "meadow",
        "harbor",
        "forest",
        "tower",
    ]
    corpus.write_text("".join(f"the {w} stood quiet under a grey sky\n" for w in words))
    args = ["gradient", "attack", "--device", "cpu", "--model", "tiny-llama", "--attack", "dager", "--corpus"]
    args += [str(corpus), "--batch-size", "2", "--min-tokens", "2", "--out", str(tmp_path / "run"), "--json"]
    code, out, _ = _main(monkeypatch, capsys, *args)
    assert code == 0, out
    item = json.loads((tmp_path / "run" / "items.json").read_text())[0]
    assert item["device"]["device"] == "cpu" and item["device"]["peak_memory_mb"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["environment"]["device"] == "cpu" and config["environment"]["device_name"]
    assert json.loads(out)["device"] == "cpu"


def test_models_and_victim_batches_go_to_the_chosen_device():
    """Plumbing with the meta device: the model, its adapter and a victim batch land on the device chosen."""
    from leaklab.threat.fedsgd import collate

    with use_device(torch.device("meta")):
        loaded = load_model(ModelRef("tiny-llama", init_seed=7))
        assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
        assert loaded.adapter.device.type == "meta"
        batch = collate(loaded, [[1, 2, 3], [4, 5]], [0, 0])
        assert {t.device.type for t in (batch.input_ids, batch.attention_mask, batch.labels)} == {"meta"}
    assert load_model(ModelRef("tiny-llama", init_seed=7)).device.type == "cpu"  # another device, another copy
    assert device_record(torch.device("meta"))["device"] == "meta"


@pytest.mark.parametrize("attack", ["dager", "somp"])
def test_every_attack_tensor_is_placed_on_the_model_device(attack):
    """Every tensor DAGER and SOMP create is placed explicitly: with unplaced tensors sent to ``meta`` the
    attack still recovers the batch exactly on the CPU model (an unplaced tensor would fail beside CUDA)."""
    from leaklab.attacks.base import make_attack
    from leaklab.threat.fedsgd import fedsgd_update

    texts = ["the cat sat on the mat today", "a quiet evening by the river bank"]
    obs, _ = fedsgd_update(ModelRef("tiny-llama"), texts)
    atk = make_attack(attack, None)
    with unplaced_tensors_fail():
        rec = atk.run(obs)
    assert sorted(rec.texts) == sorted(texts)


def test_token_probs_chunked_equal_the_whole_softmax():
    """The memory-chunked softmax kept at a token set equals the plain one (float64 over all of V)."""
    from leaklab.attacks.gradient.somp import token_probs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 500, generator=gen) * 4
    tokens = torch.tensor([3, 499, 0, 250, 17])
    slow = torch.softmax(logits.double(), dim=-1)[:, tokens]
    for rows in (1, 5, 36, 1000, None):
        assert torch.allclose(token_probs(logits, tokens, rows), slow, rtol=0, atol=1e-15)


def test_last_token_scores_do_not_depend_on_the_chunk(monkeypatch):
    """DAGER's last-token evidence is the same whatever chunk the free memory allows."""
    from leaklab.attacks.gradient import dager
    from leaklab.threat.fedsgd import fedsgd_update

    obs, _ = fedsgd_update(ModelRef("tiny-llama"), ["the cat sat on the mat today", "a quiet evening by the river"])
    spans = dager.SpanModel(obs)
    prefixes = [[1, 2, 3, 4], [5, 6, 7]]
    wide = dager.last_token_scores(spans, prefixes)
    monkeypatch.setattr(dager, "chunk_rows", lambda *_a, **_k: 2)
    narrow = dager.last_token_scores(spans, prefixes)
    assert torch.allclose(wide, narrow, rtol=1e-5, atol=1e-8)  # float32 head products, chunked differently


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the script runs the whole GPU check")
def test_gpu_check_without_cuda_is_one_line():
    """benchmarks/gpu_check.py on a CPU-only machine: exit 2 and one line naming what is missing."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0], done.stderr
