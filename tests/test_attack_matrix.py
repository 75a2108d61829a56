"""Every gradient attack × every threat setting through the runner, on tiny-llama: each cell either recovers
with the stated score or refuses with one line naming the setting; failures are outcomes, never a 0."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from leaklab.attacks.base import GRADIENT_ATTACKS, make_attack, register_gradient_attack, run_attack
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import attack_batch, summarise
from leaklab.metrics import score_bag
from leaklab.models.registry import ModelRef
from leaklab.threat.observation import SETTINGS, ThreatFlags
from leaklab.threat.settings import sample_update

BAGS = ("tokenset", "tokenset-residual")
CASES = {
    "fedsgd": (ThreatFlags(), {}),
    "fedavg": (ThreatFlags(learning_rate=1e-3), {}),
    "lora": (ThreatFlags(), {"r": 64}),
    "dpo": (ThreatFlags(), {"pairing": "label"}),
    "reward": (ThreatFlags(), {"pairing": "label"}),
    "secagg": (ThreatFlags(), {"clients": 2}),
}

#: (attack, setting) → expected outcome: ("rouge1", minimum) | ("bag", min precision, min distinct recall) |
#: ("could_not_run" | "no_signal", text in the reason). DPO's last tokens: their evidence assumes a cross-entropy loss.
#: Plain tokenset on a tied LM head: every embedding row is touched (whole vocabulary, precision ~0, recall 1);
#: the reward model has no LM head, so its rows are exact.
EXPECTED = {
    **{(a, s): ("rouge1", 1.0) for a in ("somp", "dager") for s in ("fedsgd", "fedavg", "lora", "reward", "secagg")},
    ("somp", "dpo"): ("rouge1", 0.9),
    ("dager", "dpo"): ("rouge1", 0.85),
    **{("tokenset", s): ("bag", 0.0, 1.0) for s in ("fedsgd", "fedavg", "dpo", "secagg")},
    ("tokenset", "reward"): ("bag", 1.0, 1.0),
    **{("tokenset-residual", s): ("bag", 1.0, 0.9) for s in ("fedsgd", "fedavg", "dpo", "reward", "secagg")},
    **{
        (a, "lora"): ("could_not_run", "does not support the 'lora' setting") for a in ("tokenset", "tokenset-residual")
    },
    ("somp-adaptive", "fedsgd"): ("rouge1", 1.0),  # no defense on the update: nothing to undo, plain SOMP
    **{
        ("somp-adaptive", s): ("could_not_run", f"does not support the '{s}' setting")
        for s in ("fedavg", "lora", "dpo", "reward", "secagg")
    },
    # the optimisation baselines match FedSGD gradients only; quality is bounded in test_optim_attacks.py
    **{(a, "fedsgd"): ("rouge1", 0.0) for a in ("tag", "lamp")},
    **{
        (a, s): ("could_not_run", f"does not support the '{s}' setting")
        for a in ("tag", "lamp")
        for s in ("fedavg", "lora", "dpo", "reward", "secagg")
    },
    # the LoRA sentence decoder reads adapter gradients only; without a granted token set, tiny-llama's random LM
    # guesses nothing that lowers the residual (its decoding is checked in test_utr.py)
    ("utr", "lora"): ("no_signal", "lowers the adapter update's residual"),
    **{
        ("utr", s): ("could_not_run", f"does not support the '{s}' setting")
        for s in ("fedsgd", "fedavg", "dpo", "reward", "secagg")
    },
}
#: a few steps of the optimisation baselines and the LoRA sentence decoder (their defaults run for minutes)
QUICK = {
    "tag": {"steps": 2},
    "lamp": {"steps": 2, "every": 1, "candidates": 2},
    "utr": {"starts": 1, "width": 4, "max_len": 6, "edit_rounds": 1, "edit_width": 2, "passes": 0},
}


def test_the_matrix_covers_every_registered_attack_and_setting():
    assert set(CASES) == set(SETTINGS)
    assert {a for a, _ in EXPECTED} == set(GRADIENT_ATTACKS.names())
    assert len(EXPECTED) == len(GRADIENT_ATTACKS.names()) * len(SETTINGS)


_UPDATES: dict[str, tuple] = {}


def _update(setting: str):
    if setting not in _UPDATES:
        flags, opts = CASES[setting]
        _UPDATES[setting] = sample_update(
            setting, ModelRef("tiny-llama"), "rotten-tomatoes", 2, 0, 4, 10, flags, **opts
        )
    return _UPDATES[setting]


@pytest.mark.parametrize(("attack", "setting"), sorted(EXPECTED))
def test_attack_on_setting(attack, setting):
    obs, secret = _update(setting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = attack_batch(attack, obs, secret, options=QUICK.get(attack))
    expected = EXPECTED[(attack, setting)]
    if expected[0] in ("could_not_run", "no_signal"):
        assert record.status == expected[0] and record.aggregate is None and record.recovered == []
        assert expected[1] in record.reason and "\n" not in record.reason
        return
    assert record.status == "recovered", record.reason
    if expected[0] == "rouge1":
        assert record.kind == "texts" and record.aggregate["rouge1"] >= expected[1]
    else:
        assert record.kind == "bag" and "rouge1" not in record.aggregate
        assert record.aggregate["bag_precision"] >= expected[1]
        assert record.aggregate["bag_distinct_recall"] >= expected[2]


def test_bag_is_scored_as_a_set_against_the_batch_multiset():
    """Hand-computed: truth {1, 2, 2 | 3, 4} (5 tokens), bag {1, 2, 3, 9}: 3 in common → P 3/4, R 3/5,
    F1 2·0.75·0.6/1.35 = 2/3; 3 of the 4 distinct tokens found."""
    s = score_bag([1, 2, 3, 9], [[1, 2, 2], [3, 4]])
    assert s == pytest.approx(
        {"bag_precision": 0.75, "bag_recall": 0.6, "bag_f1": 2 / 3, "bag_distinct_recall": 0.75}, abs=1e-12
    )
    obs, secret = _update("reward")
    record = attack_batch("tokenset", obs, secret)  # every text's tokens count, not one text's
    truth = [list(t) for t in secret.token_ids]
    bag = make_attack("tokenset").run(obs).token_ids[0]
    assert record.aggregate == score_bag(bag, truth)
    assert record.aggregate["bag_distinct_recall"] == 1.0


def test_summary_averages_recovered_batches_only_and_counts_the_others():
    items = [
        {"status": "recovered", "aggregate": {"rouge1": 0.5}, "attack_seconds": 1.0},
        {"status": "could_not_run", "reason": "x on the 'lora' setting: no", "aggregate": None, "attack_seconds": 0},
    ]
    s = summarise(items)
    assert s["rouge1"] == 0.5 and s["scored_batches"] == 1 and s["status"] == "recovered"
    assert s["outcomes"] == {"recovered": 1, "could_not_run": 1}
    none = summarise(items[1:])
    assert none["rouge1"] is None and none["status"] == "could_not_run" and none["reasons"] == [items[1]["reason"]]


def test_all_zero_update_is_no_signal():
    obs, _ = _update("fedsgd")
    zero = type(obs)(obs.model, "fedsgd", {k: v * 0 for k, v in obs.gradients.items()}, obs.flags, obs.batch_size)
    rec = run_attack(make_attack("somp"), zero)
    assert rec.status == "no_signal" and "all zeros" in rec.reason


@pytest.mark.parametrize("name", GRADIENT_ATTACKS.names())
def test_unknown_option_of_every_attack_lists_its_keys(name):
    keys = GRADIENT_ATTACKS.get(name).config.keys()
    with pytest.raises(LeaklabError, match=f"attack '{name}' has no option 'hops'; valid: {', '.join(keys)}"):
        make_attack(name, {"hops": "3"})


def test_duplicate_registration_is_refused_and_aliases_resolve():
    with pytest.raises(LeaklabError, match="attack 'somp' is already registered"):
        register_gradient_attack("somp")(type("Other", (), {}))
    assert make_attack("somp-any").name == "somp" and make_attack("dager-any").name == "dager"
    assert "somp-any" not in GRADIENT_ATTACKS.names()


def test_third_party_attack_through_the_entry_point_group(monkeypatch):
    """A plug-in in the ``leaklab.attacks`` group registers on first lookup and runs through the runner."""
    import importlib.metadata

    from leaklab.attacks.base import Recovery
    from leaklab.core import Registry, registry

    class Echo:
        name = "echo"

        def __init__(self, opts):
            self.opts = opts

        def run(self, obs):
            return Recovery(["hello"], None)

    reg = Registry("attack", entry_points="leaklab.test-plugins")  # the real group is leaklab.attacks

    class EP:
        name = "echo"

        def load(self):
            return lambda: reg.register("echo", Echo, help="echo")

    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [EP()] if group == "leaklab.test-plugins" else []
    )
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", set())
    assert reg.names() == ["echo"] and reg.get("echo").help == "echo"


def test_sweep_whose_attack_cannot_run_says_so_not_zero(tmp_path):
    """tokenset on LoRA updates cannot run: every row reads 'n/a: could not run', JSON leak is null."""
    from leaklab.sweep import sweep

    result = sweep(
        "clip", [1.0], "tokenset", "tiny-gpt2", "rotten-tomatoes", 2, 1, 0, tmp_path, setting="lora", max_tokens=16
    )
    for row in result["rows"]:
        assert row["leak"] is None and row["rouge1"] is None and row["status"] == "could_not_run"
        assert row["outcomes"] == {"could_not_run": 1}
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("n/a: could not run (tokenset does not support the 'lora' setting") == 2
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith(("| none |", "| 1.0 |"))]
    assert len(rows) == 2 and all(r[3].startswith("n/a: could not run") for r in rows)  # the leak column
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["leak"] for r in saved["rows"]] == [None, None]


def test_gradient_list_shows_every_attack_with_its_options():
    from typer.testing import CliRunner

    from leaklab.cli import app

    res = CliRunner().invoke(app, ["gradient", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == GRADIENT_ATTACKS.names()
    somp = {o["name"]: o for o in next(r for r in rows if r["name"] == "somp")["options"]}
    assert somp["beam"] == {
        "name": "beam",
        "type": "int",
        "default": 6,
        "help": "full-rank regime: prefixes kept per start token",
    }
    tokenset = next(r for r in rows if r["name"] == "tokenset")
    assert "lora" not in tokenset["settings"] and "lora" not in tokenset["supports"]


def test_cli_attack_that_cannot_run_says_so_and_exits_3(tmp_path):
    """A LoRA update shares no embedding gradient: `gradient attack --attack tokenset` prints the outcome, not 0."""
    from typer.testing import CliRunner

    from leaklab.cli import app

    update = tmp_path / "lora.safetensors"
    runner = CliRunner()
    args = [
        "--setting",
        "lora",
        "--model",
        "tiny-gpt2",
        "--batch-size",
        "2",
        "--max-tokens",
        "12",
        "--out",
        str(update),
    ]
    res = runner.invoke(app, ["gradient", "update-setting", *args])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "leaklab.cli", "gradient", "attack", "--attack", "tokenset", "--update", str(update)]
    res = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 3, res.stdout + res.stderr  # the real process's code, not only typer's
    assert "n/a: could not run" in res.stdout and "'lora' setting" in res.stdout
    items = json.loads((out / "items.json").read_text())
    assert items[0]["status"] == "could_not_run" and items[0]["aggregate"] is None
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert aggregate["rouge1"] is None and aggregate["outcomes"] == {"could_not_run": 1}
