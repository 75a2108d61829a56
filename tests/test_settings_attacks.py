"""SOMP/DAGER through the setting adaptation layer (leaklab.attacks.gradient.settings) on tiny models."""

from __future__ import annotations

import pytest
import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.subspace import attention_subspace, numerical_rank, span_distance
from leaklab.attacks.gradient.views import adapter_rank, fedsgd_view, lora_pseudo_gradients
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


def _adapter_update(n: int, r: int, out: int = 128, d: int = 192, seed: int = 0) -> torch.Tensor:
    """G' = ∂L/∂B·(AAᵀ)⁻¹A for ∂L/∂B = s·Σ δ_i (A x_i)ᵀ over n random inputs, shared in float32 with a
    relative round-off of 1e-7 per entry added (the size a float32 delta carries)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d, generator=gen, dtype=torch.float64) / d**0.5
    x, delta = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, out, generator=gen).double()
    grad_b = (2.0 * delta.T @ (x @ a.T)).float().double()
    grad_b += 1e-7 * grad_b.abs() * torch.randn(grad_b.shape, generator=gen, dtype=torch.float64)
    return grad_b @ torch.linalg.solve(a @ a.T, a)


@pytest.mark.parametrize(("n", "r"), [(10, 32), (31, 32), (5, 8), (40, 32), (8, 8), (200, 64)])
def test_adapter_rank_is_the_batch_rank_below_r_and_saturated_above(n, r):
    """The rank test against the count it must find: n inputs give rank min(n, r) despite float32 round-off.
    Reading the whole spectrum of the (out x d) pseudo-gradient instead gives r for every n (out > r): the
    float64 zeros beyond r sit far below the round-off, and that drop is the largest."""
    g = _adapter_update(n, r)
    assert adapter_rank(g, r) == min(n, r)
    assert numerical_rank(torch.linalg.svdvals(g)) == r


def test_lora_later_round_view_is_the_merged_model_and_pseudo_gradient_is_its_projected_gradient(tmp_path):
    """A later federated round (global B ≠ 0, from an adapter file): the view refers to the merged weights
    W' = W + s·B·A, and its pseudo-gradient block equals the slow reference s·(∂L/∂W')·Aᵀ(AAᵀ)⁻¹A computed by
    autograd on a plain copy of the model carrying W'. SOMP then recovers the batch; on the base model (the
    view before) the layer-1 inputs differ and it did not."""
    import copy
    from pathlib import Path

    from safetensors.torch import save_file

    from leaklab.models.registry import unload
    from leaklab.threat.local import TextObjective, text_batch
    from leaklab.threat.lora import LoraSpec, lora_model, lora_update

    ref, spec = ModelRef("tiny-llama"), LoraSpec(r=64, alpha=128)
    loaded = load_model(ref)
    init = lora_model(ref, spec.meta(loaded))
    gen = torch.Generator().manual_seed(1)
    adapter = {
        n: (p.detach() if ".lora_A." in n else 0.02 * torch.randn(p.shape, generator=gen))
        for n, p in init.named_parameters()
        if "lora_" in n
    }
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp_path / "adapter.safetensors"))
    texts = ["A witty, low-key romantic comedy.", "Cold, nervy and memorable."]
    obs, sec = lora_update(ref, texts, spec=spec, adapter=str(tmp_path / "adapter.safetensors"))
    view, info = fedsgd_view(obs)
    assert info["lora"]["saturated_layers"] == [] and info["lora"]["adapter_ranks"][0] < 64

    mod = "model.layers.0.self_attn.v_proj"
    a = adapter[f"base_model.model.{mod}.lora_A.default.weight"].double()
    reference = copy.deepcopy(loaded.model)
    weights = dict(reference.named_parameters())
    with torch.no_grad():
        for layer in range(2):
            for slot in "qkv":
                m = f"model.layers.{layer}.self_attn.{slot}_proj"
                la = adapter[f"base_model.model.{m}.lora_A.default.weight"]
                lb = adapter[f"base_model.model.{m}.lora_B.default.weight"]
                weights[f"{m}.weight"] += 2.0 * lb @ la
    merged = dict(load_model(view.model).model.named_parameters())
    assert torch.allclose(merged[f"{mod}.weight"], weights[f"{mod}.weight"], atol=1e-6)
    batch, _, _ = text_batch(loaded, texts, None)
    reference.zero_grad()
    TextObjective(batch, "next-token").mean_loss(reference).backward()
    grad_w = weights[f"{mod}.weight"].grad.double()
    expected = 2.0 * grad_w @ a.T @ torch.linalg.solve(a @ a.T, a)
    got = view.gradients[f"{mod}.weight"].double()
    assert float((got - expected).norm() / expected.norm()) < 1e-4

    for weights_file in Path(view.model.name).glob("*.safetensors"):  # pruned (as fl_bench does): merged again
        weights_file.unlink()
    unload(view.model)
    _, s = _attack("somp", obs, sec)
    assert s.rouge1 == 1.0
    base_view = type(view)(obs.model, "fedsgd", view.gradients, view.flags, view.batch_size)
    _, s_base = _attack("somp", base_view, sec)
    assert s_base.rouge1 < 1.0


def test_span_tolerance_bounds_true_inputs_distance_from_a_noisy_span():
    """The denoiser's tolerance against the slow truth: a rank-k stack (whitened: unit noise entries) with a
    spread of signal strengths, cut at k; every true input's distance from the estimated span stays within
    span_tolerance, which exceeds the float32 threshold 1e-3 here, while random inputs stay far outside."""
    from leaklab.attacks.gradient.views import span_tolerance

    gen = torch.Generator().manual_seed(0)
    m, d, k = 600, 128, 40
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]
    signal = u @ torch.diag(torch.logspace(5, 3.6, k, dtype=torch.float64)) @ v.T
    _, sv, vh = torch.linalg.svd(signal + torch.randn(m, d, generator=gen, dtype=torch.float64))
    tol = span_tolerance(sv, k, d)
    true_inputs = torch.cat([v.T, torch.randn(200, k, generator=gen, dtype=torch.float64) @ v.T])
    assert float(span_distance(true_inputs, vh[:k]).max()) <= tol
    assert 1e-3 < tol < 0.05
    assert float(span_distance(torch.randn(200, d, generator=gen, dtype=torch.float64), vh[:k]).min()) > 10 * tol


def test_lora_final_tokens_are_chosen_by_the_update_among_guesses(monkeypatch):
    """A LoRA update carries no output-embedding gradient, so the span attacks' texts end one token short;
    the completion picks, per text, the guess whose batch gradient reproduces the update. With the guess lists
    forced (tiny-llama's random LM guesses nothing): the true final token among 7 decoys is chosen for every
    text that has it, and the text whose list lacks it keeps its recovered tokens."""
    from leaklab.attacks.base import Recovery
    from leaklab.attacks.gradient import views

    obs, sec = _update("tiny-llama", "lora", 3, ThreatFlags(learning_rate=0.01), r=64)
    true = [list(t) for t in sec.token_ids]
    prefixes = [t[:-1] for t in true]
    decoys = {i: [(t[-1] + 101 * (j + 1)) % 49152 for j in range(7)] for i, t in enumerate(true)}

    def guesses(loaded, ids, k):
        i = prefixes.index(ids)
        return decoys[i] if i == 2 else decoys[i][:3] + [true[i][-1]] + decoys[i][3:]

    monkeypatch.setattr(views, "lm_guesses", guesses)
    rec = Recovery([""] * 3, [list(p) for p in prefixes])
    info = views.fedsgd_view(obs)[1]
    done = views.complete_lora_final_tokens(obs, rec, info)
    assert done.token_ids == [true[0], true[1], prefixes[2]]
    assert info["lora_final_tokens"]["appended"] == 2


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
