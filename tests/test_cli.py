"""CLI behaviour through a real subprocess: exit codes and one-line errors, no tracebacks."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leaklab.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_version_and_listings():
    v = cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("leaklab ")
    models = json.loads(cli("models", "--json").stdout)
    assert {"smollm2-135m", "minilm-l6", "gpt2-arch", "tiny-llama", "tiny-gpt2", "tiny-bert"} <= {
        m["name"] for m in models
    }
    corpora = json.loads(cli("corpora", "--json").stdout)
    assert {"rotten-tomatoes", "bbc-news", "chatterbot"} <= {c["name"] for c in corpora}
    assert "italian" in next(c for c in corpora if c["name"] == "chatterbot")["variants"]
    assert "smollm2-135m" in cli("models").stdout


@pytest.mark.parametrize(
    "args,needles",
    [
        (["update", "--model", "nope"], ["unknown model 'nope'", "tiny-llama"]),
        (
            ["update", "--model", "tiny-gpt2", "--corpus", "nope"],
            ["unknown corpus 'nope'", "rotten-tomatoes"],
        ),
        (["update", "--model", "tiny-gpt2", "--batch-size", "100000"], ["asked for 100000 texts"]),
        (["update", "--model", "tiny-gpt2", "--min-tokens", "500", "--max-tokens", "600"], ["no text"]),
        (["update", "--model", "someorg/not-cached-model"], ["cannot be reached"]),
        (["update", "--model", "tiny-gpt2", "--task", "bogus"], ["unknown task 'bogus'"]),
    ],
)
def test_bad_input_one_line(args, needles, tmp_path):
    one_line_error(cli(*args, "--out", str(tmp_path / "u.safetensors")), *needles)


def test_empty_corpus_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    one_line_error(
        cli("update", "--model", "tiny-gpt2", "--corpus", str(empty), "--out", str(tmp_path / "u")),
        "is empty",
    )


def test_update_writes_file_tiny(tmp_path):
    out = tmp_path / "u.safetensors"
    proc = cli("update", "--model", "tiny-llama", "--batch-size", "2", "--seed", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and (tmp_path / "u.safetensors.secret.json").exists()


@pytest.mark.real
def test_update_smollm2_roundtrip(tmp_path):
    """The issue's command: identical tensors on reload, no Secret in the Observation, identical re-run."""
    import torch

    from leaklab.models import ModelRef
    from leaklab.threat import client_update, load_update

    out = tmp_path / "u.safetensors"
    proc = cli(
        "update",
        "--model",
        "smollm2-135m",
        "--corpus",
        "rotten-tomatoes",
        "--batch-size",
        "4",
        "--seed",
        "0",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    obs = load_update(out)
    again, _ = client_update(ModelRef("smollm2-135m"), "rotten-tomatoes", 4, 0, 1, 64)
    assert obs.batch_size == 4 and obs.labels is None and obs.lengths is None
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(obs.gradients[k], again.gradients[k])
    assert set(obs.gradients) == set(again.gradients)


@pytest.mark.real
def test_demo_runs_somp_on_the_packaged_defaults(tmp_path):
    out = tmp_path / "demo"
    proc = cli("demo", "--batch-size", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["config"]["attack"] == "somp" and agg["config"]["model"]["name"] == "smollm2-135m"
    assert agg["rouge1"] == 1.0 and agg["rouge2"] == 1.0
    assert "recovered" in proc.stdout.lower() or "leaked" in proc.stdout.lower()


def test_python_dash_m_leaklab_is_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "leaklab", "--version"], capture_output=True, text=True, env=ENV, check=False
    )
    assert proc.returncode == 0 and proc.stdout.startswith("leaklab "), proc.stderr
