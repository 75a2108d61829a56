"""The gradient benchmark grid: cells, resumable after an interruption, and the report."""

import json

import pytest

import leaklab.bench.gradient as bench


def test_interrupted_cell_resumes_after_its_finished_batches(tmp_path, monkeypatch):
    calls, fail_at = [], [2]
    real = bench.attack_batch

    def flaky(attack, obs, secret, **kw):
        calls.append(obs.batch_size)
        if len(calls) == fail_at[0]:
            raise RuntimeError("killed")  # the session ends during the second batch
        return real(attack, obs, secret, **kw)

    monkeypatch.setattr(bench, "attack_batch", flaky)
    args = dict(model="tiny-llama", regimes=["short"], batch_sizes=[1], attacks=["dager"], batches=3)
    with pytest.raises(RuntimeError, match="killed"):
        bench.run_grid(tmp_path, **args)
    partial = tmp_path / "cells" / ".partial" / "tiny-llama-short-B1.json"
    kept = json.loads(partial.read_text())
    assert len(kept["grad_seconds"]) == 1 and len(kept["per_attack"]["dager"]) == 1

    calls.clear()
    fail_at[0] = 0
    (path,) = bench.run_grid(tmp_path, **args)
    assert len(calls) == 2  # only batches 2 and 3 ran again
    cell = json.loads(path.read_text())
    runs = cell["attacks"]["dager"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and runs[0] == kept["per_attack"]["dager"][0]
    assert cell["batches"] == 3 and not partial.exists()
    assert bench.run_grid(tmp_path, **args) == []  # done: skipped
    report = bench.write_report(tmp_path)
    assert "| tiny-llama | short | 1 | dager | 3 |" in report.read_text()


def test_attack_options_reach_the_attack_and_are_recorded_in_the_cell_and_the_table(tmp_path, monkeypatch):
    from leaklab.cli.gradient import attack_options
    from leaklab.errors import LeaklabError

    seen = []
    real = bench.attack_batch
    monkeypatch.setattr(
        bench, "attack_batch", lambda atk, obs, sec, **kw: seen.append(atk.opts) or real(atk, obs, sec, **kw)
    )
    options = attack_options(["dager:max_frontier=64", "dager:budget_s=30"])
    assert options == {"dager": {"max_frontier": 64, "budget_s": 30}}
    (path,) = bench.run_grid(
        tmp_path, "tiny-llama", ["short"], [1], ["dager"], batches=1, options=options, console=None
    )
    assert seen[0].max_frontier == 64 and seen[0].budget_s == 30
    assert json.loads(path.read_text())["attack_options"] == {"dager": {"max_frontier": 64, "budget_s": 30}}
    assert "| dager (budget_s=30.0, max_frontier=64) | 1 |" in bench.write_report(tmp_path).read_text()  # typed
    with pytest.raises(LeaklabError, match="ATTACK:key=value"):
        attack_options(["max_atoms=3"])
    with pytest.raises(LeaklabError, match="not run"):
        bench.run_grid(tmp_path, "tiny-llama", ["short"], [1], ["dager"], options={"somp": {"beam": 2}})
    with pytest.raises(LeaklabError, match="attack 'dager' has no option 'nope'; valid: tau1"):
        bench.run_grid(tmp_path / "x", "tiny-llama", ["short"], [1], ["dager"], options={"dager": {"nope": 1}})


def test_attacks_run_one_at_a_time_are_merged_into_one_cell_each_with_its_commit(tmp_path, monkeypatch):
    ran = []
    real = bench.attack_batch
    monkeypatch.setattr(
        bench, "attack_batch", lambda atk, obs, sec, **kw: ran.append(atk.name) or real(atk, obs, sec, **kw)
    )
    args = dict(model="tiny-llama", regimes=["short"], batch_sizes=[1], batches=1)
    (path,) = bench.run_grid(tmp_path, attacks=["dager"], options={"dager": {"budget_s": 30}}, **args)
    old = json.loads(path.read_text())
    monkeypatch.setattr(bench, "_git_commit", lambda: "later")
    (path2,) = bench.run_grid(tmp_path, attacks=["somp", "dager"], options={"somp": {"beam": 2}}, **args)
    assert path2 == path and ran == ["dager", "somp"]  # dager was stored already: only somp ran
    cell = json.loads(path.read_text())
    assert set(cell["attacks"]) == {"dager", "somp"}
    assert cell["attacks"]["dager"]["runs"] == old["attacks"]["dager"]["runs"]
    assert (
        cell["attacks"]["dager"]["git_commit"] == old["git_commit"] and cell["attacks"]["somp"]["git_commit"] == "later"
    )
    assert cell["attack_options"] == {"dager": {"budget_s": 30}, "somp": {"beam": 2}}
    assert bench.run_grid(tmp_path, attacks=["somp", "dager"], **args) == []  # both stored: skipped
    ran.clear()
    bench.run_grid(tmp_path, attacks=["dager"], force=True, **args)  # rerun one attack, keep the other
    cell = json.loads(path.read_text())
    assert (
        ran == ["dager"]
        and set(cell["attacks"]) == {"dager", "somp"}
        and cell["attack_options"] == {"somp": {"beam": 2}}
    )
    bench.run_grid(tmp_path, attacks=["dager"], force=True, **(args | {"batches": 2}))  # other batches: replaced
    cell = json.loads(path.read_text())
    assert set(cell["attacks"]) == {"dager"} and cell["batches"] == 2


def test_an_expensive_attack_runs_on_fewer_batches_of_a_stored_cell_and_keeps_its_own_count(tmp_path):
    """dager on 2 batches, then somp on the first 1: merged into one cell (2 batches), somp records 1 and the
    table says so; asking somp for 1 batch again skips the cell."""
    args = dict(model="tiny-llama", regimes=["short"], batch_sizes=[1])
    (path,) = bench.run_grid(tmp_path, attacks=["dager"], batches=2, **args)
    (path2,) = bench.run_grid(tmp_path, attacks=["somp"], batches=1, **args)
    cell = json.loads(path.read_text())
    assert path2 == path and cell["batches"] == 2 and set(cell["attacks"]) == {"dager", "somp"}
    assert bench.attack_batches(cell, "somp") == 1 and bench.attack_batches(cell, "dager") == 2
    assert len(cell["attacks"]["somp"]["runs"]) == 1 and cell["attacks"]["somp"]["runs"][0]["seed"] == 0
    assert bench.run_grid(tmp_path, attacks=["somp"], batches=1, **args) == []
    table = bench.write_report(tmp_path).read_text()
    assert "| short | 1 | somp | 1 |" in table and "| short | 1 | dager | 2 |" in table
    assert "hand note" not in table
    (tmp_path / bench.NOTES).write_text("## Notes\n\nhand note on the steps\n")
    table = bench.write_report(tmp_path).read_text()
    assert table.rstrip().endswith("hand note on the steps") and "| short | 1 | somp | 1 |" in table


def test_baseline_target_compares_somp_on_the_baselines_own_batches():
    """SOMP ≥ TAG/LAMP is judged on the batches the baselines ran on (the first n), by hand-made cells."""

    def runs(*scores):
        return [{"status": "recovered", "rouge1": s} for s in scores]

    cell = {
        "regime": {"name": "short"},
        "batch_size": 2,
        "batches": 3,
        "attacks": {
            "somp": {"runs": runs(0.5, 1.0, 0.0)},
            "tag": {"batches": 1, "runs": runs(0.4)},
            "lamp": {"batches": 2, "runs": [*runs(0.7), {"status": "no_signal", "rouge1": None}]},
        },
    }
    line = bench.baseline_target([cell], "short", 2)
    assert "reached" in line and "SOMP 0.500 vs tag 0.400 on 1 batch(es)" in line
    assert "SOMP 0.750 vs lamp 0.700 on 2 batch(es)" in line  # lamp's no-signal batch is not a 0
    cell["attacks"]["lamp"]["runs"][1] = {"status": "recovered", "rouge1": 1.0}
    line = bench.baseline_target([cell], "short", 2)
    assert "missed" in line and "SOMP 0.750 vs lamp 0.850 on 2 batch(es)" in line
    assert bench.baseline_target([cell], "short", 4).endswith("not measured")
