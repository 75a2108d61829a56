"""`leaklab embed ...` from the command line: two attacks, train/invert round trip, one-line errors, outcomes."""

import dataclasses
import json

import numpy as np
import pytest
from cli_helpers import NOT_IN_EMBED_BENCH, run_cli


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
    assert data["attack"] == "nearest" and data["aggregate"]["detect_recall"] == 1.0
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


EVERY_ATTACK = (
    *("nearest", "whitebox", "bow", "decoder", "alignment", "kb-extract", "clustering", "membership"),
    "kb-secrets",
)


@pytest.mark.parametrize("name", EVERY_ATTACK)
def test_every_attack_runs_from_the_cli(monkeypatch, capsys, tmp_path, name):
    """`leaklab embed attack` runs each registered attack on the tiny encoder with the quick bench settings and
    writes a report; inversion attacks also report the cosine of the re-embedded recovery."""
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS
    from leaklab.embed_bench import QUICK

    assert set(EVERY_ATTACK) == set(EMBED_ATTACKS.names())  # a new attack must be added here
    entry = QUICK[name] if name in QUICK else NOT_IN_EMBED_BENCH[name]
    report = tmp_path / "r.json"
    args = ["attack", "--attack", name, "--encoder", "tiny-bert", "--n", str(entry["n"]), "--out", str(report)]
    if "public_limit" in entry:
        args += ["--public-limit", str(entry["public_limit"])]
    for key, value in entry["options"].items():
        args += ["-o", f"{key}={value}"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["attack"] == name and data["aggregate"]
    if name in ("whitebox", "bow", "decoder", "kb-extract"):
        assert -1.0 <= data["aggregate"]["cosine"] <= 1.0 + 1e-6
    if name == "alignment":
        assert all(-1.0 <= row["nearest"]["cosine"] <= 1.0 + 1e-6 for row in data["aggregate"]["sweep"])


def test_inverter_of_another_encoder_and_bad_options_exit_with_one_line(monkeypatch, capsys, tmp_path):
    from leaklab.attacks.embedding.bow import BagOfWordsInverter
    from leaklab.attacks.embedding.decoder import DecoderInverter
    from leaklab.corpora.sampling import split_of
    from leaklab.models.registry import minilm_tokenizer

    def one_line(code, err, *parts):
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        for part in parts:
            assert part in err, err

    small_bow, small_dec = tmp_path / "bow8", tmp_path / "dec8"
    BagOfWordsInverter(8, ["film", "song"]).save(small_bow)
    DecoderInverter(8, [1000, 1001, 1002], minilm_tokenizer(), emb=8, hidden=8).save(small_dec)
    vecs = tmp_path / "v.npy"
    np.save(vecs, np.ones((2, 8), dtype=np.float32))
    # a saved inverter of an 8-d encoder, used with the 128-d tiny encoder
    code, _, err = run_cli(
        monkeypatch, capsys, "invert", "--inverter", str(small_dec), "--vectors", str(vecs), "--encoder", "tiny-bert"
    )
    one_line(code, err, "inverts 8-d vectors", "gives 128-d vectors")
    code, _, err = run_cli(
        monkeypatch, capsys, "invert", "--inverter", str(small_bow), "--vectors", str(vecs), "--encoder", "tiny-bert"
    )
    one_line(code, err, "inverts 8-d vectors", "gives 128-d vectors")
    code, _, err = run_cli(
        monkeypatch, capsys, "invert", "--inverter", str(small_dec), "--vectors", str(vecs), "--steps", "2"
    )
    one_line(code, err, "--steps needs --encoder")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(monkeypatch, capsys, "invert", "--inverter", str(small_bow), "--vectors", str(empty))
    one_line(code, err, "holds no vectors")
    # option values: k of the alignment sweep, probe counts
    for k in ("abc", "0", "4,-1"):
        code, _, err = run_cli(
            monkeypatch, capsys, "attack", "--attack", "alignment", "--encoder", "tiny-bert", "--n", "2",
            "-o", f"k={k}", "-o", "inner=nearest",
        )  # fmt: skip
        one_line(code, err, "option k must be comma-separated whole numbers >= 1")
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "clustering", "--encoder", "tiny-bert", "-o", "probes=0"
    )
    one_line(code, err, "option probes=0: must be at least 1")
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "nearest", "--encoder", "tiny-bert", "--public-limit", "0"
    )
    one_line(code, err, "--public-limit must be at least 1")
    # a corpus whose texts all fall in the public split: no private target can be drawn
    public_only = [t for t in (f"a public line number {i}" for i in range(40)) if split_of(t) == "public"][:3]
    corpus = tmp_path / "public.txt"
    corpus.write_text("\n".join(public_only) + "\n")
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "nearest", "--encoder", "tiny-bert", "--corpus", str(corpus)
    )
    one_line(code, err, "has no text in the private split", "give more texts")


def test_an_attack_that_cannot_run_on_its_scenario_exits_3_with_the_reason(monkeypatch, capsys, tmp_path):
    """A saved inverter of an 8-d encoder given to the bow attack on the 128-d tiny encoder: the options are
    valid, the attack cannot run on this scenario; the CLI prints n/a with the reason (never a score) and the
    run record has no metrics. A folder that holds no saved inverter is the user's error: exit 2 before any work."""
    from leaklab.attacks.embedding.bow import BagOfWordsInverter

    small_bow, record = tmp_path / "bow8", tmp_path / "record.json"
    args = ["attack", "--attack", "bow", "--encoder", "tiny-bert", "--n", "2", "-o", f"load={small_bow}"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"option load='{small_bow}' is not a saved inverter (no config.json or model.safetensors)" in err
    BagOfWordsInverter(8, ["film", "song"]).save(small_bow)
    code, out, err = run_cli(monkeypatch, capsys, *args, "--out", str(record))
    assert code == 3, err
    line = next(x for x in out.splitlines() if "n/a" in x)
    assert line.startswith("bow on tiny-bert (rotten-tomatoes, n=2): n/a: could not run (bow on 'tiny-bert': ")
    assert "inverts 8-d vectors" in line and "'tiny-bert' gives 128-d vectors" in line and "token_f1" not in out
    data = json.loads(record.read_text())
    assert data["status"] == "could_not_run" and data["aggregate"] is None and data["pairs"] == []
    assert data["reason"] in line and data["options"]["load"] == str(small_bow) and data["setting"] == "embedding"


def test_bench_renders_an_entry_that_could_not_run_as_na_and_scores_the_others(monkeypatch, capsys, tmp_path):
    """One bench entry fails on its scenario (its attack is patched to raise): the table, JSON and plots show it
    as n/a with the reason, never 0, and the other entries are still run and scored."""
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS
    from leaklab.errors import LeaklabError

    def cannot(access, public, cfg):
        raise LeaklabError("no search endpoint on this encoder")

    monkeypatch.setitem(EMBED_ATTACKS._entries, "bow", dataclasses.replace(EMBED_ATTACKS.get("bow"), impl=cannot))
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--quick", "--only", "bow,nearest", "--out", str(tmp_path))
    assert code == 0, err
    reason = "bow on 'tiny-bert': no search endpoint on this encoder"
    data = json.loads((tmp_path / "embedding-quick.json").read_text())
    bow, nearest = data["results"]["bow"], data["results"]["nearest"]
    assert bow["status"] == "could_not_run" and bow["reason"] == reason and bow["aggregate"] is None
    assert nearest["status"] == "recovered" and nearest["aggregate"]["detect_recall"] == 1.0
    target = next(t for t in data["targets"] if t["attack"] == "bow")
    assert target["measured"] is None and target["reached"] is None
    assert target["note"] == f"n/a: could not run ({reason})"
    table = (tmp_path / "embedding-quick.md").read_text()
    assert f"| bow | token F1 ≥ 0.6 | n/a | – | n/a: could not run ({reason}) |" in table
    assert f"| bow | n/a: could not run ({reason}) |" in table and "## Not scored" in table
    assert "## Nearest neighbour" in table and "| bow | 0.000" not in table
    assert (tmp_path / "embedding-quick-inversion.png").exists()
