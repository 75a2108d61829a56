from pathlib import Path

from leaklab.service.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_service_config_parses():
    cfg = load_config(ROOT / "examples" / "service.yaml")
    assert cfg.monitor.action == "noise" and cfg.search.corpus == "rotten-tomatoes"
    assert [s.kind for s in cfg.pipeline_for("partner").steps] == ["rotate"]
    assert [s.kind for s in cfg.pipeline_for("someone-else").steps] == ["quantise"]
