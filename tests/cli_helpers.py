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


#: quick settings of the registered embedding attacks that the embedding bench does not run (beside its QUICK)
NOT_IN_EMBED_BENCH = {"kb-secrets": {"n": 3, "options": {"kb_docs": 30, "templates": "diagnosis;vpn"}}}
