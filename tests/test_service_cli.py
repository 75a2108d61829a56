"""CLI of the service: keys create/list/revoke, serve's config errors, defend-eval on a tiny sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import typer
from typer.testing import CliRunner

from leaklab.cli import app


def test_keys_create_list_revoke(tmp_path):
    db = str(tmp_path / "k.db")
    r = CliRunner()
    made = r.invoke(app, ["keys", "create", "--name", "team-a", "--db", db])
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    assert secret.startswith("lk-")
    listed = json.loads(r.invoke(app, ["keys", "list", "--db", db, "--json"]).output)
    assert [k["name"] for k in listed] == ["team-a"] and listed[0]["revoked"] is None
    assert secret not in r.invoke(app, ["keys", "list", "--db", db]).output  # secrets are never shown
    assert r.invoke(app, ["keys", "revoke", "team-a", "--db", db]).exit_code == 0
    assert json.loads(r.invoke(app, ["keys", "list", "--db", db, "--json"]).output)[0]["revoked"] is not None


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "leaklab.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


def test_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defenses:\n  - kind: gaussian\n    epsilon: -1\n")
    out = _cli("serve", "--model", "hashing", "--db", str(tmp_path / "s.db"), "--config", str(bad))
    assert out.returncode == 2 and "epsilon > 0" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = _cli("serve", "--model", "nope", "--db", str(tmp_path / "s.db"))
    assert out.returncode == 2 and "valid: hashing, minilm-l6, tiny-bert" in out.stderr
    out = _cli("keys", "revoke", "ghost", "--db", str(tmp_path / "s.db"))
    assert out.returncode == 2 and "no key with id or name 'ghost'" in out.stderr


def test_defend_eval_writes_curves(tmp_path):
    from leaklab.cli.embed import defend_eval

    sub = typer.Typer()
    sub.command()(defend_eval)
    res = CliRunner().invoke(
        sub,
        [
            "--model",
            "hashing",
            "--victims",
            "100",
            "--public",
            "300",
            "--known-pairs",
            "0",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "run" / "items.json").read_text())
    assert {r["family"] for r in rows} == {"none", "gaussian", "metric-dp", "quantise", "truncate", "rotate"}
    assert (tmp_path / "run" / "privacy_utility.png").stat().st_size > 10_000
