"""`leaklab embed ...` from the command line: two attacks, train/invert round trip, one-line errors."""

import json
import sys

import numpy as np
import pytest

from leaklab.cli import main


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["leaklab", "embed", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_and_two_attacks(monkeypatch, capsys, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "list")
    assert code == 0 and "kb-extract" in out and "membership" in out
    report = tmp_path / "nn.json"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "attack",
        "--attack",
        "nearest",
        "--encoder",
        "tiny-bert",
        "--n",
        "4",
        "-o",
        "candidates=30",
        "--out",
        str(report),
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["attack"] == "nearest" and data["metrics"]["detect_recall"] == 1.0
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "attack",
        "--attack",
        "membership",
        "--encoder",
        "tiny-bert",
        "--n",
        "6",
        "-o",
        "target=kb",
    )
    assert code == 0, err
    assert "exact_query" in out


def test_train_then_invert_round_trip(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "bow"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--inverter",
        "bow",
        "--encoder",
        "tiny-bert",
        "--out",
        str(folder),
        "--train-seconds",
        "2",
        "-o",
        "epochs=1",
        "-o",
        "hidden=32",
        "-o",
        "vocab=200",
    )
    assert code == 0, err
    assert (folder / "model.safetensors").exists() and json.loads((folder / "config.json").read_text())["kind"] == "bow"
    from leaklab.encoders import load_encoder

    vecs = tmp_path / "v.npy"
    np.save(vecs, load_encoder("tiny-bert").embed(["a film", "a song"]))
    code, out, err = run_cli(monkeypatch, capsys, "invert", "--inverter", str(folder), "--vectors", str(vecs))
    assert code == 0, err
    assert len(out.strip().splitlines()) == 2


@pytest.mark.parametrize(
    "vectors,message",
    [
        (np.zeros((2, 7), dtype=np.float32), "dimension 7 does not match the encoder's dimension 128"),
        (np.full((1, 128), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_vectors_exit_with_one_line(monkeypatch, capsys, tmp_path, vectors, message):
    folder = tmp_path / "bow"
    from leaklab.attacks.embedding.bow import BagOfWordsInverter

    BagOfWordsInverter(128, ["film", "song"], hidden=8).save(folder)
    path = tmp_path / "v.npy"
    np.save(path, vectors)
    code, _, err = run_cli(monkeypatch, capsys, "invert", "--inverter", str(folder), "--vectors", str(path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_unknown_attack_and_empty_corpus_errors(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "attack", "--attack", "nope", "--encoder", "tiny-bert")
    assert code == 2 and "valid: alignment, bow" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "nearest", "--encoder", "tiny-bert", "--corpus", str(empty)
    )
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_bench_quick_writes_table_json_and_plots(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(
        monkeypatch, capsys, "bench", "--quick", "--only", "nearest,membership", "--out", str(tmp_path)
    )
    assert code == 0, err
    data = json.loads((tmp_path / "embedding-quick.json").read_text())
    assert set(data["results"]) == {"nearest", "membership"}
    table = (tmp_path / "embedding-quick.md").read_text()
    assert "## Membership" in table and "## Nearest neighbour" in table
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--quick", "--render", "--out", str(tmp_path))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--only", "nope", "--out", str(tmp_path))
    assert code == 2 and "valid:" in err
