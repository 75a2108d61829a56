"""SOMP/DAGER through the setting adaptation layer (leaklab.attacks.gradient.settings) on tiny models."""

from __future__ import annotations

import pytest
import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.subspace import attention_subspace, span_distance
from leaklab.attacks.gradient.views import fedsgd_view, lora_pseudo_gradients
from leaklab.errors import LeaklabError
from leaklab.metrics import score_batch
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.observation import ThreatFlags
from leaklab.threat.settings import sample_update


def _attack(name: str, obs, sec):
    rec = run_attack(make_attack(name), obs)
    return rec, score_batch(rec.texts, list(sec.texts), rec.token_ids, [list(t) for t in sec.token_ids])


def _update(model: str, setting: str, b: int, flags: ThreatFlags, **opts):
    return sample_update(setting, ModelRef(model), "rotten-tomatoes", b, 0, 4, 10, flags, **opts)


def test_fedavg_one_step_is_fedsgd_and_recovers_exactly():
    obs, sec = _update("tiny-llama", "fedavg", 2, ThreatFlags(learning_rate=1e-3))
    ref, _ = _update("tiny-llama", "fedsgd", 2, ThreatFlags())
    view, info = fedsgd_view(obs)
    name = "model.layers.0.self_attn.k_proj.weight"
    g, r = view.gradients[name].double(), ref.gradients[name].double()
    assert float((g - r).norm() / r.norm()) < 1e-3  # Δ/η, denoised, is the FedSGD gradient
    assert 0 < info["denoised_ranks"][0] < 128
    _, s = _attack("dager", obs, sec)
    assert s.rouge1 == 1.0 and s.rouge2 == 1.0


def test_fedavg_without_denoising_is_full_rank():
    """Reference for denoising: the raw Δ/η of a small learning rate is full rank (float32 round-off)."""
    obs, _ = _update("tiny-llama", "fedavg", 2, ThreatFlags(learning_rate=1e-3))
    adapter = load_model(obs.model).adapter
    raw = type(obs)(obs.model, "fedavg", obs.gradients, obs.flags, obs.batch_size)
    assert attention_subspace(raw, adapter, 0).full
    view, _ = fedsgd_view(obs)
    assert not attention_subspace(view, adapter, 0).full


def test_secagg_two_clients_recovers_both_batches():
    obs, sec = _update("tiny-gpt2", "secagg", 1, ThreatFlags(), clients=2)
    view, _ = fedsgd_view(obs)
    assert view.batch_size == 2 and len(sec) == 2
    _, s = _attack("dager", obs, sec)
    assert s.rouge1 == 1.0


def test_dpo_pairs_hold_two_sequences_each():
    obs, sec = _update("tiny-gpt2", "dpo", 2, ThreatFlags(), pairing="label")
    view, info = fedsgd_view(obs)
    assert obs.batch_size == 2 and view.batch_size == 4 and info["sequences_per_pair"] == 2
    rec, s = _attack("dager", obs, sec)
    assert len(rec.texts) == 4
    assert s.rouge1 > 0.85  # all but some last tokens (their evidence assumes a cross-entropy loss)


def test_lora_rank_above_tokens_is_exact_and_below_is_not():
    obs, sec = _update("tiny-llama", "lora", 2, ThreatFlags(), r=64)
    n_tokens = sum(len(t) for t in sec.token_ids)
    assert n_tokens < 64
    _, s = _attack("somp", obs, sec)
    assert s.rouge1 == 1.0
    assert fedsgd_view(obs)[1]["lora"]["saturated_layers"] == []
    small, _ = _update("tiny-llama", "lora", 2, ThreatFlags(), r=4)
    with pytest.warns(RuntimeWarning, match="full rank r = 4 on layer\\(s\\) \\[0, 1\\]"):
        view, info = fedsgd_view(small)
    assert info["lora"]["saturated_layers"] == [0, 1]
    with pytest.warns(RuntimeWarning, match="full rank r = 4"):
        rec = run_attack(make_attack("somp"), small)
    assert rec.status == "no_signal" and rec.texts == []
    assert rec.reason.startswith("somp on the 'lora' setting: the LoRA adapter gradient is saturated (rank r = 4")
    assert attention_subspace(view, load_model(small.model).adapter, 0).full


def test_lora_span_check_matches_brute_force():
    """Pseudo-gradient span check vs the direct test 'A x ∈ rowspace(∂L/∂B)' for every vocabulary token."""
    from leaklab.threat.lora import lora_model

    obs, sec = _update("tiny-llama", "lora", 1, ThreatFlags(), r=32)
    loaded = load_model(obs.model)
    view, _ = fedsgd_view(obs)
    sub = attention_subspace(view, loaded.adapter, 0)
    vocab = torch.arange(loaded.adapter.embeddings.num_embeddings)
    x = loaded.adapter.token_inputs(vocab, position=0, layer=0).double()
    fast = sub.distance(x)
    mod = "model.layers.0.self_attn.v_proj"
    a = dict(lora_model(obs.model, obs.meta["lora"]).named_parameters())[
        f"base_model.model.{mod}.lora_A.default.weight"
    ]
    gb = obs.gradients[f"base_model.model.{mod}.lora_B.default.weight"].double()
    _, sv, vh = torch.linalg.svd(gb, full_matrices=False)
    basis = vh[: int((sv > 1e-6 * sv[0]).sum())]
    ax = x @ a.detach().double().T
    slow = span_distance(ax, basis)
    inside = set(sec.token_ids[0][:-1])  # the last token feeds no loss through attention
    for ids in (fast, slow):
        members = set(torch.nonzero(ids < 1e-3).flatten().tolist())
        assert inside <= members and len(members) < 40
    assert set(torch.nonzero(fast < 1e-3).flatten().tolist()) == set(torch.nonzero(slow < 1e-3).flatten().tolist())


def test_lora_without_early_layer_adapter_is_refused():
    obs, _ = _update("tiny-llama", "lora", 1, ThreatFlags(), r=8)
    grads = {k: v for k, v in obs.gradients.items() if "layers.0." not in k}
    with pytest.raises(LeaklabError, match="no adapter on layer 0"):
        lora_pseudo_gradients(obs, grads, obs.meta["lora"])


def test_dager_refuses_update_without_attention_gradients():
    obs, _ = _update("tiny-llama", "fedsgd", 1, ThreatFlags())
    emb = {k: v for k, v in obs.gradients.items() if "embed" in k}
    stripped = type(obs)(obs.model, "fedsgd", emb, obs.flags, obs.batch_size)
    rec = run_attack(make_attack("dager"), stripped)
    assert rec.status == "could_not_run" and rec.texts == [] and rec.token_ids is None
    assert rec.reason.startswith("dager on the 'fedsgd' setting: ") and "no gradient for" in rec.reason


def test_residual_token_set_is_exact_on_input_tokens_where_plain_norm_test_is_not():
    """Tied tiny-llama: every row is non-zero, the residual outside the softmax span finds the input tokens."""
    from leaklab.attacks.gradient.tokenleak import leaked_tokens
    from leaklab.attacks.gradient.tokenset import embedding_gradient

    obs, sec = _update("tiny-llama", "fedsgd", 2, ThreatFlags())
    inputs = {t for ids in sec.token_ids for t in ids[:-1]}
    everything = {t for ids in sec.token_ids for t in ids}
    found = set(leaked_tokens(obs, exclude=256))
    assert inputs <= found <= everything
    assert int((embedding_gradient(obs).norm(dim=1) > 0).sum()) > 10 * len(everything)
