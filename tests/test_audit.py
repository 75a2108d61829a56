"""`leaklab audit`: config validation (one line, exit 2, before any work), a minimal audit on tiny models
opened in headless Chromium, resume from the step cache, redaction."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_leaklab

from leaklab.experiments.audit import AUDIT_SURFACES, AuditOptions, load_config, parse_config, run_audit
from leaklab.report.html import mask_text, redact_report

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "time_budget_min": 30,  # ample: this test checks the report, not the scaling (a loaded machine would skip steps)
    "corpus": "chatterbot:english",
    "min_tokens": 4,
    "max_tokens": 16,
    "gradient": {
        "model": "tiny-llama",
        "attack": "somp",
        "attack_options": {"budget_s": 5},
        "settings": [{"setting": "fedsgd", "batch_size": 2}, {"setting": "lora", "batch_size": 2, "options": {"r": 4}}],
        "defenses": [{"defense": "topk", "values": [0.01]}],
    },
    "embedding": {"encoder": "tiny-bert", "targets": 6, "attacks": [{"attack": "nearest"}, {"attack": "membership"}]},
    "api-defenses": {
        "encoder": "tiny-bert",
        "victims": 30,
        "public": 200,
        "defenses": [{"kind": "truncate", "param": "dims", "values": [8]}],
    },
    "kb-secrets": {
        "encoder": "tiny-bert",
        "secrets": 3,
        "kb_docs": 30,
        "templates": "vpn",
        "views": [{"scores": True}],
    },
    "lm-membership": {
        "finetune": {"model": "tiny-llama", "members": 8, "epochs": 2, "lr": 1e-3, "canary_repeats": "4"},
        "attacks": ["loss", "reference"],
        "bootstrap": 20,
        "exposure_samples": 20,
    },
}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return run_leaklab(monkeypatch, capsys, "audit", *args)


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_writes_the_commented_example_and_examples_parse(tmp_path, monkeypatch, capsys):
    target = tmp_path / "a.yaml"
    code, out, _ = run_cli(monkeypatch, capsys, "init", str(target))
    assert code == 0 and "leaklab audit --config" in out
    text = target.read_text()
    assert text.count("#") > 10  # commented
    cfg = load_config(target)
    assert set(cfg.sections) == set(AUDIT_SURFACES.names()) - {"flower"}  # flower: in audit-full only
    assert cfg.sections["gradient"].model == "smollm2-135m" and cfg.sections["embedding"].encoder == "minilm-l6"
    assert [s.setting for s in cfg.sections["gradient"].setting_specs()] == ["fedsgd", "lora"]
    assert text == (ROOT / "examples" / "audit-quick.yaml").read_text()
    full = load_config(ROOT / "examples" / "audit-full.yaml")
    assert len(full.sections["gradient"].setting_specs()) > 2
    assert set(full.sections) == set(AUDIT_SURFACES.names())  # the thorough run audits every surface
    code, _, err = run_cli(monkeypatch, capsys, "init", str(target))  # refuses to overwrite
    assert code == 2 and "--force" in err


def test_keys_document_every_section(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "keys", "--json")
    rows = json.loads(out)
    assert code == 0 and all(r["help"] for r in rows)
    keys = {(r["where"], r["name"]) for r in rows}
    assert {
        ("(top level)", "time_budget_min"),
        ("gradient", "model"),
        ("gradient.settings[]", "learning_rate"),
        ("embedding", "encoder"),
        ("api-defenses.defenses[]", "kind"),
    } <= keys


BAD = [
    ({"gradient": {"model": "tiny-llama"}, "colour": 1}, "no key 'colour'; valid: corpus"),
    ({"gradient": {"modle": "tiny-llama"}}, "has no option 'modle'; valid: model, attack"),
    ({"gradient": {"settings": [{"setting": "fedsgd", "lr": 1}]}}, "gradient.settings[0] has no option 'lr'"),
    ({"gradient": {"model": "tiny-bert"}}, "gradient.model: 'tiny-bert' is not a causal LM"),
    ({"corpus": "no-such-file.txt"}, "corpus file 'no-such-file.txt' does not exist"),
    ({"embedding": {"encoder": "http://127.0.0.1:{port}#minilm-l6"}}, "is unreachable"),
    ({"gradient": {"defenses": [{"defense": "nosuch", "values": [1]}]}}, "unknown defense 'nosuch'"),
    ({"kb-secrets": {"encoder": "tiny-bert", "secret": 3}}, "'kb-secrets' has no option 'secret'; valid: encoder"),
    ({"kb-secrets": {"views": [{"scores": False, "noise": 1}]}}, "kb-secrets.views[0] has no option 'noise'"),
    ({"kb-secrets": {"templates": "no slot here"}}, "template 'no slot here' has no slot"),
    ({"lm-membership": {"model": "tiny-bert", "members": "m.txt", "non_members": "n.txt"}}, "is not a causal LM"),
    ({"lm-membership": {"finetune": {"model": "tiny-bert"}}}, "lm-membership.finetune.model: 'tiny-bert' is not a"),
    ({"lm-membership": {"model": "tiny-llama", "members": "nope.txt", "non_members": "n.txt"}}, "'nope.txt' does not"),
    ({"lm-membership": {"model": "tiny-llama"}}, "give members and non_members files"),
    ({"lm-membership": {"attacks": ["loss", "nosuch"]}}, "unknown membership attack 'nosuch'"),
    ({"flower": {"model": "tiny-llama", "defenses": ["dp"]}}, "flower.defenses[0]: unknown Flower defense 'dp'"),
    ({"flower": {"model": "tiny-bert"}}, "flower.model: 'tiny-bert' is not a causal LM"),
    ({"gradient": {"model": "tiny-llama", "sweep_attack": "somp-adaptiv"}}, "gradient.sweep_attack: unknown"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_config_is_one_line_exit_2_before_any_work(tmp_path, monkeypatch, capsys, data, message):
    data = json.loads(json.dumps(data).replace("{port}", str(free_port())))
    monkeypatch.chdir(tmp_path)
    Path("n.txt").write_text("a text we did not train on\n")
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "--config", str(write(tmp_path, data)), "--out", str(out))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in " ".join(err.split()), err
    assert not out.exists()  # nothing started


def test_missing_config_file_is_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_redaction_masks_beyond_the_first_characters():
    assert mask_text("secret text here", 3) == "sec••• •••• ••••"
    report = {"surfaces": [{"examples": [{"private": "my password is x", "recovered": "my password", "where": "a"}]}]}
    red = redact_report(report)
    assert "password" not in json.dumps(red) and red["surfaces"][0]["examples"][0]["private"].startswith("my pas")
    assert "password" in json.dumps(report)  # the original is untouched


def _browser_or_fail() -> None:
    if shutil.which("chromium") is None:
        if os.environ.get("LEAKLAB_ALLOW_NO_BROWSER") == "1":
            pytest.skip("chromium missing and LEAKLAB_ALLOW_NO_BROWSER=1")
        pytest.fail("chromium is not installed: `make install` installs Debian's chromium package")


def test_browser_check_sees_errors_and_requests(tmp_path):
    """The checker itself can fail: a page with a console error and a remote image is reported as such."""
    _browser_or_fail()
    from leaklab.report.browser import check_page

    page = tmp_path / "bad.html"
    port = free_port()
    page.write_text(
        f"<html><body><section data-section='summary'></section><img src='http://127.0.0.1:{port}/x.png'>"
        "<script>console.error('boom')</script></body></html>"
    )
    seen = check_page(page, tmp_path / "bad.png")
    assert any("boom" in e for e in seen.console_errors)
    assert seen.network_requests(page.resolve().as_uri()) == [f"http://127.0.0.1:{port}/x.png"]
    assert seen.sections == ["summary"]


def test_tiny_audit_report_in_headless_chromium(tmp_path):
    """A minimal audit on tiny models; the report opens in Chromium with no console error and no request, the
    summary and every surface rendered; a rerun resumes entirely from the step cache."""
    _browser_or_fail()
    from leaklab.report.browser import check_page

    out = tmp_path / "audit"
    report = run_audit(parse_config(TINY, "tiny.yaml"), out, command="leaklab audit --config tiny.yaml")
    assessed = {s["surface"] for s in report["surfaces"]}
    assert assessed == set(TINY) - set(AuditOptions.keys())
    assert {n["surface"] for n in report["not_assessed"]} == set(AUDIT_SURFACES.names()) - assessed == {"flower"}
    assert all("not configured" in n["reason"] for n in report["not_assessed"])  # listed, never silently skipped
    grad = next(s for s in report["surfaces"] if s["surface"] == "gradient")
    assert grad["evidence"]["metric"] == "ROUGE-1" and grad["examples"]
    assert [r["defense"] for r in grad["data"]["sweep"]] == ["none", "topk"]
    emb = next(s for s in report["surfaces"] if s["surface"] == "embedding")
    assert any("queries" in t["columns"][-2] for t in emb["tables"])
    kbs = next(s for s in report["surfaces"] if s["surface"] == "kb-secrets")
    (view,) = kbs["data"]["views"]
    assert view["view"].startswith("scores") and view["queries_per_secret"] > 0 and view["secrets"] == 3
    assert kbs["evidence"]["metric"] == "exact secrets" and kbs["evidence"]["value"] == view["exact_share"]
    lm = next(s for s in report["surfaces"] if s["surface"] == "lm-membership")
    assert [r["attack"] for r in lm["data"]["attacks"]] == ["loss", "reference"]
    assert all(r["auc"] is not None and r["tpr1"] is not None for r in lm["data"]["attacks"])
    assert lm["evidence"]["risk"] in ("high", "medium", "low") and any("Canaries" in t["title"] for t in lm["tables"])
    assert any("base model" in f for f in lm["flags"]) and lm["plots"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["reproducibility"]["environment"]["packages"]["torch"]
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html

    shot = tmp_path / "report.png"
    seen = check_page(out / "report.html", shot)
    assert shot.stat().st_size > 10_000
    assert seen.console_errors == [] and seen.page_errors == []
    assert seen.network_requests((out / "report.html").resolve().as_uri()) == []
    assert {"summary", "not-assessed", "scaling", "reproducibility"} <= set(seen.sections)
    assert seen.surfaces == [s["surface"] for s in report["surfaces"]]

    again = run_audit(parse_config(TINY, "tiny.yaml"), out)
    steps = sum(s["steps"]["planned"] for s in again["surfaces"])
    assert again["reproducibility"]["steps_from_cache"] == steps
    assert again["summary"] == report["summary"]


def test_time_budget_scales_batches_and_states_it():
    from leaklab.experiments.audit.run import build_surfaces, choose_scale

    data = {
        "time_budget_min": 1,
        "gradient": {"model": "tiny-llama", "attack_options": {"budget_s": 60}, "batches": 4},
        "embedding": {"encoder": "tiny-bert", "targets": 40, "attacks": [{"attack": "bow"}]},
        "kb-secrets": {"encoder": "tiny-bert", "secrets": 40, "kb_docs": 1000},
        "lm-membership": {"finetune": {"model": "tiny-llama", "members": 64}},
    }
    surfaces = build_surfaces(parse_config(data))
    full = {n: s.plan(1.0) for n, s in surfaces.items()}
    scale = choose_scale(full, 60)
    assert 0 < scale < 1
    assert sum(s.estimate_s for p in full.values() for s in p.steps) * scale == pytest.approx(60)
    scaled = {n: s.plan(scale) for n, s in surfaces.items()}
    assert len(scaled["gradient"].steps) < len(full["gradient"].steps) == 4
    notes = " ".join(c for p in scaled.values() for c in p.scaling)
    assert "batches per setting 4 →" in notes and "time limit per batch 60 s →" in notes
    assert "private targets 40 →" in notes and "training time" in notes
    assert "planted secrets 40 →" in notes and "fine-tune members 64 →" in notes
    assert choose_scale(full, 10**6) == 1.0 and not any(p.scaling for p in full.values())


def test_a_step_past_its_time_limit_is_stopped_and_listed(tmp_path, monkeypatch):
    import time

    from rich.console import Console

    from leaklab.experiments.audit import run as audit_run
    from leaklab.experiments.audit.surfaces import Plan, Step

    monkeypatch.setattr(audit_run, "MIN_STEP_S", 0.5)
    calls = []

    def slow() -> dict:
        time.sleep(30)
        return {}

    def fast() -> dict:
        calls.append(1)
        return {"ok": 1}

    plans = {
        "fast": Plan([Step("a", "fast step", {"k": 1}, fast, 0.01)]),
        "slow": Plan([Step("a", "slow step", {}, slow, 0.01), Step("b", "next", {"k": 2}, fast, 0.01)]),
    }
    t0 = time.perf_counter()
    results, skipped, cached = audit_run.run_steps(plans, tmp_path, 0.2, Console(quiet=True))
    assert time.perf_counter() - t0 < 10
    assert results == {"fast": {"a": {"ok": 1}}, "slow": {}}
    assert [(s["step"], s["reason"].split(" (")[0]) for s in skipped] == [
        ("slow step", "stopped at its time limit"),
        ("next", "time budget spent"),
    ]
    again, _, cached = audit_run.run_steps({"fast": plans["fast"]}, tmp_path, 0.2, Console(quiet=True))
    assert cached == 1 and calls == [1] and again["fast"]["a"] == {"ok": 1}  # resumed from the cache
    _, skipped, _ = audit_run.run_steps(plans, tmp_path / "new", 0.2, Console(quiet=True), cached_only=True)
    assert calls == [1] and len(skipped) == 3 and all("--cached-only" in s["reason"] for s in skipped)


def test_flower_surface_simulates_a_federation_and_attacks_each_client(tmp_path):
    """A real Flower simulation (Ray engine, 2 ClientApps, 1 round) audited by the surface: every client update
    and the aggregate attacked and scored, with the clients named in order."""
    data = {
        "corpus": "chatterbot:english",
        "min_tokens": 4,
        "max_tokens": 16,
        "flower": {"model": "tiny-llama", "clients": 2, "rounds": 1, "attack_options": {"budget_s": 5}, "val_texts": 0},
    }
    report = run_audit(parse_config(data), tmp_path / "fl")
    (fl,) = report["surfaces"]
    rows = fl["data"]["per_client"]
    assert sorted(r["target"] for r in rows) == ["aggregate", "client 1", "client 2"]
    assert all(r["rouge1"] == 1.0 and r["outcome"] == "recovered" for r in rows)
    assert fl["evidence"] == {"risk": "high", "metric": "client ROUGE-1", "value": 1.0, "detail": "defense none"}
    assert fl["examples"] and "not configured" in report["not_assessed"][0]["reason"]


def test_a_step_that_would_overrun_at_the_measured_pace_is_skipped(tmp_path):
    """The first step ran 6× its estimate: a later step whose estimate at that pace no longer fits the surface's
    share is skipped with the reason; one that still fits runs."""
    import time

    from rich.console import Console

    from leaklab.experiments.audit import run as audit_run
    from leaklab.experiments.audit.surfaces import Plan, Step

    def slow() -> dict:
        time.sleep(0.3)
        return {"slow": 1}

    def fast() -> dict:
        return {"fast": 1}

    steps = [Step("a", "slow", {"a": 1}, slow, 0.05), Step("b", "big", {"b": 1}, fast, 0.5)]
    plans = {"s": Plan([*steps, Step("c", "small", {"c": 1}, fast, 0.01)])}
    results, skipped, _ = audit_run.run_steps(plans, tmp_path, 1.0, Console(quiet=True))
    assert set(results["s"]) == {"a", "c"}
    (skip,) = skipped
    assert (
        skip["step"] == "big"
        and "would overrun the time budget" in skip["reason"]
        and "measured pace" in skip["reason"]
    )


def test_defended_sweep_points_go_to_the_adaptive_attacker_and_the_report_says_so():
    """``sweep_attack: somp-adaptive``: every defended sweep point is attacked by the attacker who knows the
    defense, the undefended point (also the setting's own attack) by ``attack``; the note names which."""
    from leaklab.experiments.audit.gradient import _adaptive_note
    from leaklab.experiments.audit.run import build_surfaces

    gradient = {"model": "tiny-llama", "defenses": [{"defense": "topk", "values": [0.1, 0.01]}]}
    naive = build_surfaces(parse_config({"gradient": gradient}))["gradient"].plan(1.0)
    adaptive = build_surfaces(parse_config({"gradient": {**gradient, "sweep_attack": "somp-adaptive"}}))
    steps = {st.spec.get("defense", "-"): st.spec["attack"] for st in adaptive["gradient"].plan(1.0).steps}
    assert steps == {"none": "somp", "topk": "somp-adaptive"}
    assert {st.spec["attack"] for st in naive.steps} == {"somp"}
    assert "knows each defense" in _adaptive_note("somp-adaptive") and "ignores it" in _adaptive_note("somp")
