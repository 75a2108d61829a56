"""The ``leaklab`` command line: one module per command group, mounted explicitly by :mod:`leaklab.cli.main`."""

from leaklab.cli.main import app, main

__all__ = ["app", "main"]
