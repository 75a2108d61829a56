"""Typed options of the embedding attacks: each attack accepts only its own keys, values are checked by type,
and `leaklab embed list` shows every option with its default and help."""

import dataclasses
import json

import pytest
from cli_helpers import run_cli

from leaklab.attacks.embedding.registry import EMBED_ATTACKS, Scenario
from leaklab.core import Config
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import run_embedding

NAMES = EMBED_ATTACKS.names()


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_lists_that_attacks_keys(name):
    entry = EMBED_ATTACKS.get(name)
    keys = [f.name for f in dataclasses.fields(entry.config)]
    want = f"embedding attack '{name}' has no option 'bogus'; valid: {', '.join(keys)}"
    with pytest.raises(LeaklabError) as err:
        entry.options({"bogus": 1})
    assert str(err.value) == want
    with pytest.raises(LeaklabError, match="has no option 'bogus'"):
        run_embedding(name, Scenario("tiny-bert", n=1), {"bogus": 1})


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_exits_2_with_one_line_from_the_cli(monkeypatch, capsys, name):
    code, _, err = run_cli(monkeypatch, capsys, "attack", "--attack", name, "--encoder", "tiny-bert", "-o", "bogus=1")
    keys = ", ".join(f.name for f in dataclasses.fields(EMBED_ATTACKS.get(name).config))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"embedding attack '{name}' has no option 'bogus'; valid: {keys}" in " ".join(err.split())


@pytest.mark.parametrize("name", NAMES)
def test_each_attack_has_a_typed_config_with_defaults_and_help(name):
    entry = EMBED_ATTACKS.get(name)
    assert issubclass(entry.config, Config) and entry.help and entry.extra["access"]
    cfg = entry.options({})
    assert cfg == entry.config() and entry.options(cfg.to_dict()) == cfg  # the recorded config reads back
    assert all(row["help"] for row in entry.config.describe()), name


def test_another_attacks_option_and_bad_values_fail_naming_the_option(monkeypatch, capsys):
    with pytest.raises(LeaklabError, match="'nearest' has no option 'hops'; valid: candidates, near_exact, k"):
        EMBED_ATTACKS.get("nearest").options(["hops=3"])
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "nearest", "--encoder", "tiny-bert", "-o", "hops=3"
    )
    assert code == 2 and "has no option 'hops'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "nearest", "--encoder", "tiny-bert", "-o", "k=abc"
    )
    assert code == 2 and "'nearest' option 'k': expected an integer, got 'abc'" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(LeaklabError, match="option k=0: must be at least 1"):
        EMBED_ATTACKS.get("nearest").options({"k": 0})
    with pytest.raises(LeaklabError, match="option 'decode': 'best' is not one of ef1, threshold"):
        EMBED_ATTACKS.get("bow").options(["decode=best"])
    with pytest.raises(LeaklabError, match="option 'inner': 'dager' is not one of nearest, bow, decoder, whitebox"):
        EMBED_ATTACKS.get("alignment").options(["inner=nearest,dager"])
    with pytest.raises(LeaklabError, match="alignment's inner decoder has no option 'spans'"):
        EMBED_ATTACKS.get("alignment").options(["decoder=arch=gru,spans=2"])


def test_sub_attack_options_are_fields_of_the_attack():
    """kb-extract's white-box search takes wb_vocab/wb_candidates, alignment's inner decoder its own pairs;
    the white-box start's bag-of-words inverter shares the attack's vocab."""
    kb = EMBED_ATTACKS.get("kb-extract").options(["vocab=300", "wb_vocab=50", "candidates=9", "wb_candidates=3"])
    assert (kb.vocab, kb.candidates) == (300, 9)
    assert (kb.search().vocab, kb.search().candidates, kb.bow().vocab) == (50, 3, 50)
    assert (kb.search().passes, kb.bow().augment) == (6, 4)  # the shared fields keep their defaults
    align = EMBED_ATTACKS.get("alignment").options(["decoder=arch=gru,train_seconds=5", "train_seconds=7"])
    assert align.decoder_training().train_seconds == 5.0 and align.train_seconds == 7.0
    assert align.decoder_training().vocab == 4000 and align.vocab == 8000
    assert align.ks == [16, 64, 256, 1024]


def test_the_report_records_the_full_config(monkeypatch, capsys, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "nearest", "--encoder", "tiny-bert", "--n", "2",
        "-o", "candidates=20", "--out", str(report),
    )  # fmt: skip
    assert code == 0, err
    recorded = json.loads(report.read_text())["options"]
    assert recorded == {"candidates": 20, "near_exact": 0.999, "k": 5}


def test_embed_list_json_lists_every_attack_with_its_options(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "list", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert sorted(rows) == NAMES
    for name, row in rows.items():
        want = EMBED_ATTACKS.get(name).config.describe()
        assert row["options"] == json.loads(json.dumps(want)) and row["help"] and row["access"], name
    nearest = {o["name"]: o for o in rows["nearest"]["options"]}
    assert nearest["k"] == {"name": "k", "type": "int", "default": 5, "help": nearest["k"]["help"]}
    code, out, _ = run_cli(monkeypatch, capsys, "list")
    assert code == 0 and all(name in out for name in NAMES) and "near_exact" in out


def test_attack_help_names_the_registered_attacks(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "attack", "--help")
    assert code == 0 and EMBED_ATTACKS.help_names() in " ".join(out.replace("│", " ").split())
