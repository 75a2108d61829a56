"""DAGER: exact recovery on tiny decoders, threat-model gate, best-effort warning."""

import pytest
import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.dager import DagerAttack, SpanModel, last_tokens
from leaklab.evaluate import score_recovery
from leaklab.models import ModelRef
from leaklab.threat import client_update, fedsgd_update


@pytest.mark.parametrize(
    ("name", "batch_size", "seed"),
    [
        ("tiny-llama", 1, 0),
        ("tiny-llama", 2, 1),
        ("tiny-llama", 4, 2),
        ("tiny-gpt2", 1, 0),
        ("tiny-gpt2", 3, 1),
        ("tiny-gpt2", 4, 2),
    ],
)
def test_exact_recovery_on_tiny_decoders(name, batch_size, seed):
    obs, secret = client_update(ModelRef(name), "rotten-tomatoes", batch_size, seed, 8, 24)
    assert sum(len(t) for t in secret.token_ids) < 128  # below the hidden size: exact regime
    rec = run_attack(make_attack("dager"), obs)
    score = score_recovery(obs, secret, rec)["aggregate"]
    assert score["exact_rate"] == 1.0 and score["rouge1"] == 1.0
    assert not rec.info["best_effort"]


def test_last_token_comes_from_the_output_gradient():
    texts = ["An utterly charming little comedy", "Nothing here works at all"]
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), texts)
    spans = SpanModel(obs)
    got = last_tokens(spans, [list(t[:-1]) for t in secret.token_ids])
    assert got == [t[-1] for t in secret.token_ids]


def test_attack_refuses_a_secret():
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), ["A short text for the gate."])
    assert secret.texts
    with pytest.raises(TypeError, match="never a Secret"):
        run_attack(DagerAttack(), secret)
    assert "secret" not in str(obs.meta).lower()


def test_full_rank_gradient_warns_and_still_answers():
    # 8 texts x 20-24 tokens > hidden size 128 of tiny-llama: full rank, best effort
    obs, _ = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 8, 0, 20, 24)
    with pytest.warns(RuntimeWarning, match="full rank"):
        rec = run_attack(make_attack("dager", best_effort_max_len=12), obs)
    assert rec.info["best_effort"] and "warning" in rec.info
    assert len(rec.texts) == 8
    assert "budget_stop" not in rec.info and max(len(t) for t in rec.token_ids) > 2
    # a spent time budget closes every prefix where it stands (first token + its last token) and says so
    with pytest.warns(RuntimeWarning, match="full rank"):
        cut = run_attack(make_attack("dager", best_effort_max_len=12, budget_s=0.0), obs)
    assert cut.info["budget_stop"] == 1 and len(cut.texts) == 8
    assert max(len(t) for t in cut.token_ids) <= 2


def test_encoder_recovery_on_tiny_bert():
    obs, secret = fedsgd_update(
        ModelRef("tiny-bert", "classify"), ["a gripping thriller", "dull and slow"], labels=[1, 0]
    )
    rec = run_attack(make_attack("dager"), obs)
    assert score_recovery(obs, secret, rec)["aggregate"]["rouge1"] == 1.0
    assert torch.is_tensor(obs.gradients[next(iter(obs.gradients))])
