"""Running the ``leaklab`` command line inside a test."""

import sys

from leaklab.cli import main


def run_cli(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``leaklab embed ARGS``."""
    return run_leaklab(monkeypatch, capsys, "embed", *args)


def run_leaklab(monkeypatch, capsys, *argv):
    """(exit code, stdout, stderr) of ``leaklab ARGV`` run in-process through the console entry point."""
    monkeypatch.setattr(sys, "argv", ["leaklab", *argv])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
