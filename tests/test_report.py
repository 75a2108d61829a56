import json
import os

import pytest

from leaklab.errors import LeaklabError
from leaklab.io import atomic_write, atomic_write_json
from leaklab.report import run_folder
from leaklab.report.run import STATUS_FILE


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})

    def boom(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_run_dir_records_environment(tmp_path):
    with run_folder(tmp_path / "run", "t") as run:
        run.write_config({"seed": 3})
        assert run.path != tmp_path / "run" and not (tmp_path / "run").exists()  # written beside, not in place
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["environment"]["packages"]["torch"].startswith("2.13")
    assert run.path == tmp_path / "run" and os.path.isdir(run.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _finished(path, seed):
    with run_folder(path, "t") as run:
        run.write_config({"seed": seed})
        run.write_items([{"i": seed}])
        run.write_aggregate({"n": 1})


def test_existing_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    _finished(out, 1)
    with pytest.raises(LeaklabError, match="already exists; pass --overwrite"):
        _finished(out, 2)
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    with run_folder(out, "t", overwrite=True) as run:
        run.write_config({"seed": 3})
        assert json.loads((out / "config.json").read_text())["seed"] == 1  # the old run stays until the end
    assert json.loads((out / "config.json").read_text())["seed"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # replaced as a whole, nothing old left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(LeaklabError, match="is a file"), run_folder(tmp_path / "file", "t", overwrite=True):
        pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_interrupted_run_leaves_no_finished_folder(tmp_path, exc):
    """Partial results go to <out>.incomplete with a status; an old run at <out> is left untouched."""
    out = tmp_path / "run"
    _finished(out, 1)
    with pytest.raises(type(exc)), run_folder(out, "t", overwrite=True) as run:
        run.write_config({"seed": 2})
        run.write_items([{"i": 0}])
        raise exc
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    status = json.loads((tmp_path / "run.incomplete" / STATUS_FILE).read_text())
    assert status["status"] == ("incomplete" if isinstance(exc, KeyboardInterrupt) else "failed")
    assert not (tmp_path / "run.incomplete" / "aggregate.json").exists()
    with pytest.raises(KeyboardInterrupt), run_folder(tmp_path / "fresh", "t") as run:
        run.write_config({"seed": 2})  # config alone is no result: nothing is kept
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.incomplete"]
    with run_folder(out, "t", overwrite=True) as run:
        run.write_config({"seed": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # a finished run supersedes the leftovers
