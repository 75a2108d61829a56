"""DAGER: exact recovery on tiny decoders, threat-model gate, best-effort warning."""

import pytest
import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.dager import DagerAttack, SpanModel, last_tokens
from leaklab.experiments.runner import score as score_recovery
from leaklab.models import ModelRef
from leaklab.threat import ThreatFlags, client_update, fedsgd_update


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


def test_full_rank_without_batch_size_decodes_the_guessed_number_of_texts():
    # the same full-rank batch with the batch size withheld: DAGER decodes d/16 texts (8 on tiny-llama, d=128), not 1
    obs, secret = client_update(
        ModelRef("tiny-llama"), "rotten-tomatoes", 8, 0, 20, 24, ThreatFlags(batch_size_known=False)
    )
    assert obs.batch_size is None
    with pytest.warns(RuntimeWarning, match="full rank"):
        rec = run_attack(make_attack("dager", best_effort_max_len=12), obs)
    assert rec.info["batch_size_estimate"] == 128 // 16 == len(rec.texts)
    assert sum(1 for t in rec.token_ids if len(t) > 2) > 1  # more than one text is decoded
    assert score_recovery(obs, secret, rec)["aggregate"]["rouge1"] > 0.0


def test_encoder_recovery_on_tiny_bert():
    obs, secret = fedsgd_update(
        ModelRef("tiny-bert", "classify"), ["a gripping thriller", "dull and slow"], labels=[1, 0]
    )
    rec = run_attack(make_attack("dager"), obs)
    assert score_recovery(obs, secret, rec)["aggregate"]["rouge1"] == 1.0
    assert torch.is_tensor(obs.gradients[next(iter(obs.gradients))])


def test_encoder_lengths_see_a_text_end_behind_a_stray_candidate():
    from leaklab.attacks.gradient.dager import encoder_lengths

    # texts of 3 and 5 tokens; at position 3 a stray token (distance 1e-4, true ones ~1e-8) keeps the count at 2
    dist = {
        0: [1e-8, 2e-8],
        1: [1e-8, 3e-8],
        2: [2e-8, 1e-8],
        3: [1e-8, 1e-4],
        4: [2e-8],
    }

    class Stub:
        def layer1_distances(self, p):
            return torch.tensor(dist[p] + [0.5] * 10, dtype=torch.float64)

    cands = [torch.arange(len(dist[p])) for p in range(5)]
    assert encoder_lengths(Stub(), cands) == [3, 4, 5]  # both counts' drops are tried; exact scoring decides
    assert encoder_lengths(Stub(), cands, margin=1e6) == [4, 5]  # counting every candidate alone misses 3
