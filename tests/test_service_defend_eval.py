"""defend-eval: the adaptive attacker, rotation and its known-plaintext break, probe vs a library fit."""

from __future__ import annotations

import pytest

from leaklab.service.defend_eval import default_sweep, plot_curves, prepare, prior_f1, run_sweep, table_md
from leaklab.service.encoders import load_encoder


@pytest.fixture(scope="module")
def data():
    return prepare(load_encoder("hashing").embed, "bbc-news:paragraphs", 150, 400, seed=0, vocab_size=500)


def test_the_attacker_is_the_registered_attacks_on_an_access_object(data, monkeypatch):
    """defend-eval runs the registered bow and nearest attacks (typed options) through the runner: each receives
    an Access (defended leaked vectors, a counting black-box tenant, the granted pairs and candidate documents)
    and public data holding no victim text; their predictions are scored by the runner."""
    import dataclasses

    from leaklab.attacks.embedding.access import Access, PublicData
    from leaklab.attacks.embedding.registry import EMBED_ATTACKS

    seen = {}
    for name in ("bow", "nearest"):
        entry = EMBED_ATTACKS.get(name)

        def spy(access, public, cfg, entry=entry):
            assert isinstance(access, Access) and isinstance(public, PublicData)
            assert not set(data.victim_texts) & set(public.texts())
            assert access.pairs is not None and len(access.pairs) == 40
            seen[entry.name] = (type(cfg).__name__, access.grants())
            pred = entry.impl(access, public, cfg)
            assert access.encoder.usage.queries > 0  # the attacker's own tenant was queried, and counted
            return pred

        monkeypatch.setitem(EMBED_ATTACKS._entries, name, dataclasses.replace(entry, impl=spy))
    sweep = [s for s in default_sweep() if s[0] == "none"]
    (row,) = run_sweep(data, sweep, seed=0, known_pairs=(40,))
    assert row["status"] == "recovered" and row["bow_token_f1"] > prior_f1(data)
    assert seen["bow"][0] == "BowConfig" and seen["nearest"][0] == "NearestConfig"
    grants = seen["bow"][1]
    assert grants["leaked_pairs"] == 40 and grants["leaked_vectors"]["count"] == len(data.victim_texts)
    assert grants["black_box_encoder"]["encoder"] == "defended-api"


def test_rotation_blocks_without_pairs_and_breaks_with_them(data):
    sweep = [s for s in default_sweep() if s[0] in ("none", "rotate")]
    rows = {(r["family"], r["known_pairs"]): r for r in run_sweep(data, sweep, seed=0, known_pairs=(0, 300))}
    none, rot, broken = rows[("none", 0)], rows[("rotate", 0)], rows[("rotate", 300)]
    assert none["nn_reidentification"] == 1.0 and none["bow_token_f1"] > prior_f1(data) + 0.02
    assert rot["label_precision@10"] == pytest.approx(none["label_precision@10"])  # utility kept exactly
    assert rot["nn_reidentification"] < 0.05 and rot["bow_token_f1"] < none["bow_token_f1"] - 0.03
    assert broken["nn_reidentification"] > 0.95  # >= d known pairs recover the rotation (Procrustes)


def test_noise_trades_utility_for_privacy(data):
    sweep = [s for s in default_sweep() if s[0] == "gaussian"]
    rows = run_sweep(data, sweep, seed=0)
    util = [r["neighbour_recall@10"] for r in rows]
    cos = [r["cosine_to_clean"] for r in rows]
    assert util == sorted(util) and cos == sorted(cos)  # larger ε, less noise, more utility


def test_a_point_whose_attacker_cannot_run_is_na_not_zero(data, tmp_path):
    """More known pairs than the attacker has texts: that point's outcome is 'could not run' with the reason
    and no attack values (n/a in the table, a marker in the plot); the other point is scored as before."""
    sweep = [s for s in default_sweep() if s[0] == "none"]
    ok, failed = run_sweep(data, sweep, seed=0, known_pairs=(0, 5000))
    assert ok["status"] == "recovered" and ok["reason"] is None and ok["nn_reidentification"] == 1.0
    assert failed["status"] == "could_not_run" and failed["bow_token_f1"] is None
    assert failed["nn_reidentification"] is None and failed["label_precision@10"] == ok["label_precision@10"]
    assert failed["reason"] == (
        "adaptive attacker on 'none' with 5000 known pairs: 5000 known pairs asked for, but the attacker has 400 texts"
    )
    table = table_md([ok, failed])
    assert f"| n/a: could not run ({failed['reason']}) | n/a |" in table and f"{ok['bow_token_f1']:.3f}" in table
    plot_curves([ok, failed], prior_f1(data), tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").stat().st_size > 0
