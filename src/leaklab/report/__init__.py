"""Run folders: configuration, per-item and aggregate JSON, written atomically."""

from leaklab.report.run import RunDir, environment, new_run_dir

__all__ = ["RunDir", "environment", "new_run_dir"]
