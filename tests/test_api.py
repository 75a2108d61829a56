"""The public Python API: ``import leaklab`` names, Observations from plain gradient dicts, attack/score/run."""

from __future__ import annotations

import pytest
import torch

import leaklab
from leaklab.errors import LeaklabError


def test_public_names_resolve():
    for name in leaklab.__all__:
        assert getattr(leaklab, name) is not None, name
    assert {"ModelRef", "Observation", "Secret", "ThreatFlags", "observation_from_gradients", "attack", "score"} <= set(
        leaklab.__all__
    )
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        leaklab.nope  # noqa: B018


def _gradients(texts):
    obs, secret = leaklab.fedsgd_update(leaklab.ModelRef("tiny-gpt2"), texts)
    return dict(obs.gradients), secret


def test_observation_from_a_plain_gradient_dict_attack_score_and_run():
    texts = ["a quiet film about grief", "loud and dumb fun"]
    grads, _ = _gradients(texts)
    obs = leaklab.observation_from_gradients("tiny-gpt2", grads, batch_size=2)
    assert obs.flags.batch_size_known and obs.batch_size == 2 and obs.setting == "fedsgd"
    rec = leaklab.attack("dager", obs)
    assert rec.status == "recovered" and sorted(rec.texts) == sorted(texts)
    assert leaklab.score(obs, texts, rec)["rouge1"] == 1.0
    record = leaklab.run("somp", obs, texts, budget_s=60)
    assert record.status == "recovered" and record.aggregate["rouge1"] == 1.0 and record.options["budget_s"] == 60
    hidden = leaklab.observation_from_gradients("tiny-gpt2", grads)
    assert not hidden.flags.batch_size_known and hidden.batch_size is None


def test_observation_from_gradients_names_the_mismatch():
    grads, _ = _gradients(["one text"])
    name = next(iter(grads))
    with pytest.raises(LeaklabError, match=r"'nope\.weight' .* is not a parameter of model 'tiny-gpt2'"):
        leaklab.observation_from_gradients("tiny-gpt2", {"nope.weight": torch.zeros(2)})
    with pytest.raises(LeaklabError, match=f"update tensor '{name}' has shape \\(3,\\)"):
        leaklab.observation_from_gradients("tiny-gpt2", {name: torch.zeros(3)})
    with pytest.raises(LeaklabError, match=r"is a list, expected a torch\.Tensor"):
        leaklab.observation_from_gradients("tiny-gpt2", {name: [0.0]})
    with pytest.raises(LeaklabError, match="empty"):
        leaklab.observation_from_gradients("tiny-gpt2", {})
    with pytest.raises(LeaklabError, match="unknown threat setting 'fedprox'"):
        leaklab.observation_from_gradients("tiny-gpt2", grads, setting="fedprox", batch_size=1)


def test_score_refuses_an_attack_that_could_not_run():
    grads, _ = _gradients(["one text"])
    emb = {k: v for k, v in grads.items() if "wte" in k}
    obs = leaklab.observation_from_gradients("tiny-gpt2", emb, batch_size=1)
    rec = leaklab.attack("somp", obs)
    assert rec.status == "could_not_run" and rec.reason.startswith("somp on the 'fedsgd' setting")
    with pytest.raises(LeaklabError, match="nothing to score: the attack's outcome is 'could_not_run'"):
        leaklab.score(obs, ["one text"], rec)
    assert leaklab.run("somp", obs, ["one text"]).aggregate is None
