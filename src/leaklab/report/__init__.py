"""Run folders (written atomically as a whole) and the environment record."""

from leaklab.report.run import RunDir, check_output, environment, run_folder

__all__ = ["RunDir", "check_output", "environment", "run_folder"]
