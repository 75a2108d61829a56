"""Running the ``leaklab`` command line inside a test."""

import sys

from leaklab.cli import main


def run_cli(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``leaklab embed ARGS``."""
    monkeypatch.setattr(sys, "argv", ["leaklab", "embed", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
