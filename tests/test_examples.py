from pathlib import Path

from leaklab.service.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_service_config_parses():
    cfg = load_config(ROOT / "examples" / "service.yaml")
    assert cfg.monitor.action == "noise" and cfg.search.corpus == "rotten-tomatoes"
    assert [s.kind for s in cfg.pipeline_for("partner").steps] == ["rotate"]
    assert [s.kind for s in cfg.pipeline_for("someone-else").steps] == ["quantise"]


def test_python_api_example_recovers_both_texts_exactly(tmp_path):
    """examples/python_api.py: plain-transformers gradient → leaklab Observation → SOMP; last line rouge1=1.0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = ROOT / "examples" / "python_api.py"
    out = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "m")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "rouge1=1.0"
    assert sorted(lines[:-1]) == [
        "recovered: my pin code is nine four two",
        "recovered: the patient was seen on tuesday",
    ]
