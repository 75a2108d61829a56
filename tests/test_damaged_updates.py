"""Damaged update files through the real CLI (`leaklab gradient attack --update ...`): truncations, header
edits, wrong types, zero/NaN gradients, secrets that contradict the update, a task mismatch. Each must exit 2
with one error line: never a traceback, never exit 0."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leaklab.cli import main
from leaklab.models import ModelRef
from leaklab.threat import ThreatFlags, fedsgd_update, save_update
from leaklab.threat.store import secret_path

TEXTS = ["A gripping little thriller.", "Dull, slow and long."]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """One valid tiny-llama B=2 update with its secret; every case damages a copy."""
    path = tmp_path_factory.mktemp("valid") / "u.safetensors"
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), TEXTS, flags=ThreatFlags())
    save_update(path, obs, secret)
    return path


def _parts(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(src), framework="pt") as fh:
        header = json.loads(fh.metadata()["leaklab"])
    return header, load_file(str(src))


def _write(dst: Path, src: Path, header=None, tensors=None, raw_meta: str | None = None, secret=None) -> None:
    """``dst`` from ``src``'s parts (``header``/``tensors`` replacing them), with ``src``'s secret or ``secret``
    (text written as is; a callable makes the secret path itself)."""
    h, t = _parts(src)
    meta = {"leaklab": raw_meta if raw_meta is not None else json.dumps(h if header is None else header)}
    save_file(t if tensors is None else tensors, str(dst), metadata=meta)
    if secret is None:
        secret_path(dst).write_text(secret_path(src).read_text())
    elif callable(secret):
        secret(secret_path(dst))
    else:
        secret_path(dst).write_text(secret)


def _truncate(n: int | float) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        data = src.read_bytes()
        dst.write_bytes(data[: int(len(data) * n) if isinstance(n, float) else n])
        secret_path(dst).write_text(secret_path(src).read_text())

    return make


def _header(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        header, _ = _parts(src)
        edit(header)
        _write(dst, src, header=header)

    return make


def _tensors(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        _, tensors = _parts(src)
        edit(tensors)
        _write(dst, src, tensors=tensors)

    return make


def _secret(text_or_make) -> Callable[[Path, Path], None]:
    return lambda src, dst: _write(dst, src, secret=text_or_make)


def _secret_json(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        data = json.loads(secret_path(src).read_text())
        _write(dst, src, secret=json.dumps(edit(data)))

    return make


def _set(*path_value):
    *keys, value = path_value

    def edit(d: dict) -> None:
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


def _drop(key):
    return lambda d: d.pop(key)


def _first(t: dict) -> str:
    return next(iter(t))


def _nan(t: dict) -> None:
    t[_first(t)] = t[_first(t)].clone()
    t[_first(t)][0, 0] = float("nan")


def _zero(t: dict) -> None:
    for k in t:
        t[k] = torch.zeros_like(t[k])


def _one_text(d: dict) -> dict:
    return {k: v[:1] if isinstance(v, list) else v for k, v in d.items()}


CASES: dict[str, Callable[[Path, Path], None]] = {
    "empty file": _truncate(0),
    "4 bytes": _truncate(4),
    "cut in the header length": _truncate(7),
    "cut in the header": _truncate(64),
    "cut in half": _truncate(0.5),
    "one byte short": _truncate(0.99999),
    "no leaklab metadata": lambda s, d: (save_file(_parts(s)[1], str(d), metadata={"x": "y"}), None)[1],
    "metadata not JSON": lambda s, d: _write(d, s, raw_meta="{oops"),
    "header a list": lambda s, d: _write(d, s, raw_meta="[1, 2]"),
    "missing setting": _header(_drop("setting")),
    "missing model": _header(_drop("model")),
    "missing flags": _header(_drop("flags")),
    "missing format": _header(_drop("format")),
    "other format": _header(_set("format", "leaklab-update/9")),
    "unknown setting": _header(_set("setting", "fedsgdx")),
    "setting a number": _header(_set("setting", 3)),
    'batch_size "two"': _header(_set("batch_size", "two")),
    "batch_size 0": _header(_set("batch_size", 0)),
    "batch_size -1": _header(_set("batch_size", -1)),
    "batch_size 1000": _header(_set("batch_size", 1000)),
    "batch_size 1": _header(_set("batch_size", 1)),
    "batch_size 2.5": _header(_set("batch_size", 2.5)),
    "batch_size true": _header(_set("batch_size", True)),
    "batch size without its flag": _header(_set("flags", "batch_size_known", False)),
    "model a string": _header(_set("model", "tiny-llama")),
    "model without name": _header(lambda h: h["model"].pop("name")),
    "unknown task": _header(_set("model", "task", "regress")),
    'num_labels "2"': _header(_set("model", "num_labels", "2")),
    "num_labels 0": _header(_set("model", "num_labels", 0)),
    "num_labels null": _header(_set("model", "num_labels", None)),
    "setting null": _header(_set("setting", None)),
    "flags a list": _header(_set("flags", [])),
    'local_steps "1"': _header(_set("flags", "local_steps", "1")),
    "unknown flag": _header(_set("flags", "oracle", True)),
    "one label for B=2": _header(lambda h: h.update(labels=[0], flags={**h["flags"], "labels_known": True})),
    "lengths not integers": _header(
        lambda h: h.update(lengths=["a", "b"], flags={**h["flags"], "lengths_known": True})
    ),
    "header task classify on a next-token update": _header(_set("model", "task", "classify")),
    "dpo setting on a classify model": _header(
        lambda h: h.update(setting="dpo", model={**h["model"], "task": "classify"})
    ),
    "all-zero gradients": _tensors(_zero),
    "NaN gradient": _tensors(_nan),
    "inf gradient": _tensors(lambda t: t.__setitem__(_first(t), torch.full_like(t[_first(t)], float("inf")))),
    "no tensors": _tensors(lambda t: t.clear()),
    "float16 tensor": _tensors(lambda t: t.__setitem__(_first(t), t[_first(t)].half())),
    "tensor of another shape": _tensors(lambda t: t.__setitem__(_first(t), t[_first(t)][:-1].contiguous())),
    "secret with 1 text for B=2": _secret_json(_one_text),
    "secret not JSON": _secret("{not json"),
    "secret empty file": _secret(""),
    "secret without token_ids": _secret_json(lambda d: {k: v for k, v in d.items() if k != "token_ids"}),
    "secret a list": _secret_json(lambda d: d["texts"]),
    "secret token_ids not integers": _secret_json(lambda d: {**d, "token_ids": [["a"], ["b"]]}),
    "secret texts and labels disagree": _secret_json(lambda d: {**d, "labels": [0]}),
    "secret a directory": _secret(lambda p: p.mkdir()),
}


def run_attack(monkeypatch, capsys, *args: str) -> tuple[int | str, str]:
    """(exit code, stderr) of ``leaklab gradient attack ARGS`` in this process; an exception that escapes
    the entry point (a traceback for the user) is returned as its type name."""
    monkeypatch.setattr(sys, "argv", ["leaklab", "gradient", "attack", "--attack", "dager", *args])
    try:
        main()
        code: int | str = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # what the user would see as a traceback
        code = type(exc).__name__
    return code, capsys.readouterr().err


def assert_one_line_error(code, err: str, case: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"{case}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{case}: {err!r}"
    assert "Traceback" not in err


def test_valid_update_is_accepted(valid, tmp_path, monkeypatch, capsys):
    """The corpus's source is sound, so each refusal below is the damage's doing."""
    code, err = run_attack(monkeypatch, capsys, "--update", str(valid), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "aggregate.json").read_text())["rouge1"] == 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_update_exits_2_with_one_line(case, valid, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.safetensors"
    CASES[case](valid, bad)
    code, err = run_attack(monkeypatch, capsys, "--update", str(bad), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, case)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [("--task", "classify"), ("--model", "tiny-llama", "--task", "classify")])
def test_task_flag_contradicting_the_update_is_refused(flags, valid, monkeypatch, capsys):
    code, err = run_attack(monkeypatch, capsys, "--update", str(valid), *flags)
    assert_one_line_error(code, err, " ".join(flags))
    assert "--task classify contradicts" in err


@pytest.mark.parametrize("case", ['batch_size "two"', "secret not JSON", "cut in half", "all-zero gradients"])
def test_damaged_update_through_a_real_process(case, valid, tmp_path):
    bad = tmp_path / "bad.safetensors"
    CASES[case](valid, bad)
    res = subprocess.run(
        [sys.executable, "-m", "leaklab.cli", "gradient", "attack", "--attack", "dager", "--update", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(res.returncode, res.stderr, case)
    assert not (tmp_path / "runs").exists()
