import json
import os

import pytest

from leaklab.io import atomic_write, atomic_write_json
from leaklab.report import new_run_dir


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
    run = new_run_dir(tmp_path / "run", "t")
    run.write_config({"seed": 3})
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["environment"]["packages"]["torch"].startswith("2.13")
    assert os.path.isdir(run.path)
