"""`python -m leaklab` runs the CLI (the same as the `leaklab` command)."""

from leaklab.cli.main import main

main()
