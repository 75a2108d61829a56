"""Run folders through the real CLI: Ctrl-C during an attack exits 130 with "interrupted" and leaves no folder
that reads as a finished run; `--out` onto an existing run is refused unless `--overwrite`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaklab.cli import main
from leaklab.models import ModelRef
from leaklab.threat import ThreatFlags, fedsgd_update, save_update


def leaklab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leaklab.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, f"the attack ended ({proc.returncode}) before it was interrupted"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} in {folder} after {timeout} s")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_an_attack_exits_130_and_leaves_no_finished_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "leaklab.cli", "gradient", "attack", "--attack", "dager", "--model", "tiny-llama"]
    cmd += ["--batch-size", "2", "--batches", "500", "--min-tokens", "4", "--max-tokens", "16", "--out", str(out)]
    logs = tmp_path.parent / f"{tmp_path.name}-logs"  # outside tmp_path, whose listing is asserted below
    logs.mkdir()
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a hang is dumped (SIGABRT below) instead of lost
    with open(logs / "out", "w") as stdout, open(logs / "err", "w") as stderr:
        # Ctrl-C as a terminal sends it: an earlier test in this process (Ray, a browser driver) may leave SIGINT
        # ignored, and an ignored SIGINT is inherited by the child, so it is reset to the default there
        proc = subprocess.Popen(
            cmd,
            stdout=stdout,
            stderr=stderr,
            text=True,
            env=env,
            preexec_fn=_default_sigint,  # noqa: PLW1509
        )
        try:
            _wait_for(".run.tmp-*/items.json", tmp_path, proc)  # the attack is under way: a batch is recorded
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to err
                proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = (logs / "err").read_text()
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "interrupted", err
    assert "Traceback" not in err
    assert not out.exists()
    kept = tmp_path / "run.incomplete"  # what it measured, marked as such
    assert json.loads((kept / "status.json").read_text())["status"] == "incomplete"
    assert (kept / "items.json").exists() and not (kept / "aggregate.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.incomplete"]  # no temporary folder left


@pytest.fixture(scope="module")
def update(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upd") / "u.safetensors"
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), ["A gripping thriller.", "Dull and slow."], flags=ThreatFlags())
    save_update(path, obs, secret)
    return path


def test_out_onto_an_old_run_is_refused_unless_overwrite(update, tmp_path):
    out = tmp_path / "run"
    base = ("gradient", "attack", "--attack", "dager", "--update", str(update), "--out", str(out))
    assert leaklab(*base, cwd=tmp_path).returncode == 0
    first = (out / "config.json").stat().st_mtime_ns
    res = leaklab(*base, cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "already exists; pass --overwrite" in lines[0], res.stderr
    assert (out / "config.json").stat().st_mtime_ns == first  # the old run is untouched
    res = leaklab(*base, "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").stat().st_mtime_ns != first
    assert json.loads((out / "aggregate.json").read_text())["rouge1"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["leaklab", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ("gradient", "sweep", "--defense", "clip", "--values", "1", "--model", "tiny-llama"),
        ("embed", "attack", "--attack", "nearest", "--encoder", "tiny-bert"),
        ("embed", "defend-eval", "--model", "hashing"),
        ("embed", "train", "--inverter", "bow", "--encoder", "tiny-bert"),
    ],
)
def test_other_outputs_refuse_an_existing_out(args, tmp_path, monkeypatch, capsys):
    """Refused before any work (no model load): the check runs right after the names are resolved."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "sweep.json").write_text("{}")
    target = old / "sweep.json" if args[1] == "attack" else old
    code, err = _cli(monkeypatch, capsys, *args, "--out", str(target))
    assert code == 2 and "already exists; pass --overwrite" in err, err
    assert (old / "sweep.json").read_text() == "{}"
