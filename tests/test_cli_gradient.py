"""`leaklab gradient attack`: a run end to end on a tiny model, and bad input -> one clear line, exit 2."""

import json
import subprocess
import sys

import pytest
import torch

from leaklab.models import ModelRef
from leaklab.threat import ThreatFlags, fedsgd_update, save_update


def leaklab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leaklab.cli", "gradient", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def saved_update(tmp_path_factory):
    path = tmp_path_factory.mktemp("upd") / "update.safetensors"
    obs, secret = fedsgd_update(
        ModelRef("tiny-llama"), ["A gripping little thriller.", "Dull, slow and long."], flags=ThreatFlags()
    )
    save_update(path, obs, secret)
    return path, obs, secret


def test_attack_saved_update_json(saved_update, tmp_path):
    path, _, _ = saved_update
    res = leaklab("attack", "--attack", "dager", "--update", str(path), "--json", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    agg = json.loads(res.stdout)
    assert agg["rouge1"] == 1.0 and agg["config"]["update"] == str(path)
    assert (tmp_path / "run" / "aggregate.json").exists()


def test_fresh_batches_table(tmp_path):
    res = leaklab(
        "attack",
        "--attack",
        "somp",
        "--model",
        "tiny-gpt2",
        "--batch-size",
        "2",
        "--batches",
        "1",
        "--min-tokens",
        "8",
        "--max-tokens",
        "16",
        "--out",
        str(tmp_path / "r"),
    )
    assert res.returncode == 0, res.stderr
    assert "ROUGE-1" in res.stdout and "recovered" in res.stdout


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_update_from_another_model_is_named(saved_update):
    path, _, _ = saved_update
    res = leaklab("attack", "--update", str(path), "--model", "tiny-gpt2")
    _one_line_error(res, "not a parameter of model 'tiny-gpt2'")
    res = leaklab("attack", "--update", str(path), "--model", "smollm2-135m")
    _one_line_error(res, "shape", "(49152, 128)", "(49152, 576)")


def test_nan_gradient_is_refused(saved_update, tmp_path):
    _, obs, secret = saved_update
    grads = dict(obs.gradients)
    name = next(iter(grads))
    grads[name] = grads[name].clone()
    grads[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    from dataclasses import replace

    save_update(bad, replace(obs, gradients=grads), secret)
    _one_line_error(leaklab("attack", "--update", str(bad)), "NaN/inf", name)


def test_contradicting_batch_size_is_refused(saved_update):
    path, _, _ = saved_update
    _one_line_error(leaklab("attack", "--update", str(path), "--batch-size", "5"), "contradicts", "batch of 2")
    assert torch.is_tensor(saved_update[1].gradients[next(iter(saved_update[1].gradients))])


def test_unknown_corpus_or_length_range_fails_before_any_batch(tmp_path):
    out = tmp_path / "run"
    base = ("attack", "--attack", "dager", "--model", "tiny-llama", "--batch-size", "2", "--out", str(out))
    res = leaklab(*base, "--corpus", "nosuch")
    _one_line_error(res, "unknown corpus 'nosuch'", "valid: bbc-news")
    res = leaklab(*base, "--min-tokens", "500", "--max-tokens", "600")
    _one_line_error(res, "has 500..600 tokens")
    assert not out.exists()  # no run folder (and no progress line) for a run that cannot start
