"""Adaptive SOMP against known defenses: the known-noise projection and the top-k low-rank completion against
slow references on planted low-rank matrices, and the attack end to end on tiny-llama through the runner."""

from __future__ import annotations

import torch

from leaklab.attacks.gradient.adaptive import choose_rank, complete_low_rank, project_known_noise


def _planted(m: int, d: int, r: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, d, generator=gen, dtype=torch.float64)


def test_known_noise_projection_matches_a_slow_reference():
    """Rank-3 60 × 40 signal + N(0, σ²): the kept rank is 3 and the projection equals the one built from the
    Gram matrix's eigenvectors row by row (least squares per row); it is closer to the signal than the noisy
    matrix."""
    truth = _planted(60, 40, 3, 0)
    sigma = 0.05
    noisy = truth + sigma * torch.randn(60, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast, k = project_known_noise(noisy, sigma, 1.5)
    assert k == 3
    _, evecs = torch.linalg.eigh(noisy.T @ noisy)
    basis = evecs[:, -3:]  # d × 3, the top eigenvectors
    slow = torch.stack([basis @ torch.linalg.lstsq(basis, row.unsqueeze(1)).solution.squeeze(1) for row in noisy])
    assert torch.allclose(fast, slow, atol=1e-10)
    assert (fast - truth).norm() < 0.5 * (noisy - truth).norm()


def test_low_rank_completion_recovers_a_planted_matrix_and_its_rank():
    """60 % of a rank-3 40 × 30 matrix's entries kept at random: hard-impute at rank 3 recovers every entry
    (relative error < 1e-4) and the held-out choice of rank picks 3."""
    truth = _planted(40, 30, 3, 2)
    kept = torch.rand(40, 30, generator=torch.Generator().manual_seed(3)) < 0.6
    observed = torch.where(kept, truth, 0.0)
    done = complete_low_rank(observed, kept, 3, 400)
    assert float((done - truth).norm() / truth.norm()) < 1e-4
    assert torch.equal(done[kept], truth[kept])
    assert choose_rank(observed, kept, [1, 2, 3, 6, 12], 100) == 3


def test_dpsgd_noise_std_the_adaptive_attacker_assumes_matches_the_noise_opacus_adds():
    """DP-SGD on tiny-llama (B = 2): the update with noise minus the same update without noise (same clipping)
    has per-coordinate std σ·C/B, the value ``known_sigma`` derives from the defense record; Gaussian/Laplace
    records map to their std, clipping to none, DP-SGD without a granted batch size to none."""
    from leaklab.attacks.gradient.adaptive import known_sigma
    from leaklab.defenses import defended_update, make_defense
    from leaklab.models import ModelRef

    ref = ModelRef("tiny-llama")
    args = ("fedsgd", ref, "rotten-tomatoes", 2, 0)
    noisy, _ = defended_update(*args, [make_defense("dpsgd", noise_multiplier=3.0, clip=0.5)], 4, 16)
    clean, _ = defended_update(*args, [make_defense("dpsgd", noise_multiplier=0.0, clip=0.5)], 4, 16)
    diff = torch.cat([(noisy.gradients[n] - clean.gradients[n]).flatten() for n in clean.gradients])
    rec = noisy.meta["defenses"][0]
    expected = known_sigma(rec, noisy.batch_size)
    assert expected == 3.0 * 0.5 / 2
    assert abs(float(diff.std()) / expected - 1) < 0.02 and diff.numel() > 10_000
    assert known_sigma(rec, None) is None
    assert known_sigma({"name": "gaussian", "std": 0.1}, 2) == 0.1
    assert abs(known_sigma({"name": "laplace", "scale": 1.0}, 2) - 2**0.5) < 1e-12
    assert known_sigma({"name": "clip", "params": {"max_norm": 1.0}}, 2) is None


def _noise(m: int, d: int, sigma: float, seed: int) -> torch.Tensor:
    return sigma * torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_null_gain_bound_matches_a_monte_carlo_of_the_noise_along_a_fixed_direction():
    """‖N u‖² of a unit u under N(0, σ²) entries (M × d): mean σ²M and std σ²√(2M), the closed form the bound
    is built on (z = 0 is the mean, z = 1 one std above); 4,000 draws."""
    from leaklab.attacks.gradient.adaptive import null_gain_bound

    m, d, sigma = 50, 20, 0.3
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    draws = torch.stack(
        [(sigma * torch.randn(m, d, generator=gen, dtype=torch.float64) @ u).pow(2).sum() for _ in range(4000)]
    )
    mean, std = null_gain_bound(sigma, m, 0.0), null_gain_bound(sigma, m, 1.0) - null_gain_bound(sigma, m, 0.0)
    assert abs(float(draws.mean()) / mean - 1) < 0.02
    assert abs(float(draws.std()) / std - 1) < 0.06


def _planted_tokens(sigma: float, seed: int = 5):
    """A 'vocabulary' of 300 inputs in d = 32, a batch of 8 of them with output gradients of decreasing scale
    (A: 48 × 8), G = A X + N(0, σ²); one extra vocabulary row is the clean group's top right singular vector
    plus a little outside the batch's span (a token that a greedy first pick takes before the true inputs
    explain it)."""
    gen = torch.Generator().manual_seed(seed)
    d, m = 32, 48
    vocab = torch.randn(300, d, generator=gen, dtype=torch.float64)
    true = [3, 17, 42, 99, 150, 201, 250, 299]
    scales = torch.tensor([4.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8], dtype=torch.float64)
    a = torch.randn(m, 8, generator=gen, dtype=torch.float64) * scales
    clean = a @ vocab[true]
    top = torch.linalg.svd(clean, full_matrices=False).Vh[0]
    off = vocab[7] - torch.linalg.qr(vocab[true].T).Q @ (torch.linalg.qr(vocab[true].T).Q.T @ vocab[7])
    vocab[7] = 5 * top + 0.5 * off / off.norm()  # not in the batch: its top direction and a bit outside its span
    return vocab, true, clean + _noise(m, d, sigma, seed + 1)


def _slow_greedy(stack: torch.Tensor, inputs: torch.Tensor, bound: float) -> list[int]:
    """Greedy selection by brute force: at each step every candidate's residual ‖G − G P‖² refit from scratch
    (least squares onto the selected inputs' span), the largest drop kept while above ``bound``."""
    chosen: list[int] = []

    def resid(rows: list[int]) -> float:
        if not rows:
            return float(stack.pow(2).sum())
        basis = torch.linalg.qr(inputs[rows].T).Q
        return float((stack - stack @ basis @ basis.T).pow(2).sum())

    while True:
        now = resid(chosen)
        drops = {v: now - resid([*chosen, v]) for v in range(inputs.shape[0]) if v not in chosen}
        best = max(drops, key=drops.get)
        if drops[best] <= bound:
            return chosen
        chosen.append(best)


def test_token_selection_matches_brute_force_greedy_and_admits_exactly_the_batch():
    """On a planted noisy group: the fast incremental selection's forward picks equal a brute-force greedy
    (refit per candidate) with the same noise bound; after pruning the set is exactly the batch — the
    planted combination row, picked first, is dropped — while a spectral cut at the noise's edge misses
    weak batch directions that the per-token test keeps."""
    from leaklab.attacks.gradient.adaptive import null_gain_bound, project_known_noise, prune_tokens, select_tokens

    sigma = 1.6
    vocab, true, noisy = _planted_tokens(sigma)
    picked, info = select_tokens(noisy, vocab, sigma, 6.0)
    slow = _slow_greedy(noisy, vocab, null_gain_bound(sigma, noisy.shape[0], 6.0))
    assert slow[0] == 7 and info["forward"] == len(slow) == 9
    assert sorted(prune_tokens(noisy, vocab, slow, null_gain_bound(sigma, noisy.shape[0], 6.0))) == sorted(picked)
    assert sorted(picked) == true and info["pruned"] == 1
    assert project_known_noise(noisy, sigma, 1.5)[1] < len(true)
    # pure noise: nothing passes the bound
    none, _ = select_tokens(_noise(48, 32, sigma, 9), vocab, sigma, 6.0)
    assert none == []


def test_adaptive_somp_selects_the_batch_tokens_under_known_gaussian_noise_end_to_end():
    """tiny-llama, B = 2, Gaussian noise σ = 1e-3 on the update, through the runner: the known-σ token selection
    keeps only batch tokens (all but at most one of them) and the pool decoder on that set recovers the texts
    (ROUGE-1 ≥ 0.7); the selection is recorded in the run's info."""
    from leaklab.defenses import defended_update, make_defense
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef

    obs, secret = defended_update(
        "fedsgd", ModelRef("tiny-llama"), "rotten-tomatoes", 2, 0, [make_defense("gaussian", sigma=1e-3)], 4, 16
    )
    rec = attack_batch("somp-adaptive", obs, secret, options={"budget_s": 30})
    step = rec.info["adaptive"]["steps"][0]
    true = {t for ids in secret.token_ids for t in ids}
    assert step["sigma"] == 1e-3 and len(true) - 1 <= step["token_selection"]["selected"] <= len(true)
    assert rec.status == "recovered" and rec.aggregate["rouge1"] >= 0.7


def test_kept_block_span_check_finds_exactly_the_batch_tokens_on_a_planted_sparsified_group():
    """A rank-8 group G = A X (64 × 48, X: 8 of 300 vocabulary rows) with a top-k-like mask: every entry of 40
    rows × 24 columns kept, the rest kept at random 30 %. ``saturated_block`` finds a fully kept block whose rank
    (8) is below its size, and the span check on its columns alone admits exactly the batch's tokens — the same
    set a slow reference gets by a least-squares fit of each token's restricted input onto the block's rows."""
    from leaklab.attacks.gradient.adaptive import block_tokens, saturated_block

    gen = torch.Generator().manual_seed(11)
    vocab = torch.randn(300, 48, generator=gen, dtype=torch.float64)
    true = [5, 40, 77, 120, 161, 200, 244, 290]
    clean = torch.randn(64, 8, generator=gen, dtype=torch.float64) @ vocab[true]
    kept = torch.rand(64, 48, generator=gen) < 0.3
    kept[:40, :24] = True
    sparse = torch.where(kept, clean, 0.0)
    block = saturated_block(sparse, kept)
    assert block is not None
    rows, cols = block
    assert bool(kept[rows][:, cols].all()) and cols.numel() > 8
    fast = block_tokens(sparse, block, vocab, 1e-6)
    sub = sparse[rows][:, cols]
    resid = [
        float((x - sub.T @ torch.linalg.lstsq(sub.T, x.unsqueeze(1)).solution.squeeze(1)).norm() / x.norm())
        for x in vocab[:, cols]
    ]
    slow = [i for i, r in enumerate(resid) if r < 1e-6]
    assert fast.tolist() == slow == true
    # no saturated block when nothing is kept densely
    assert saturated_block(torch.where(kept & False, clean, 0.0), kept & False) is None


def test_kept_only_sketch_draws_only_kept_coordinates_and_keeps_the_dense_sketch_unchanged():
    """``sketch_index(kept_only=True)`` on a sparsified update picks only its non-zero coordinates; without it
    the indices are the ones the dense sketch always drew (same seed, same subset)."""
    from leaklab.attacks.gradient.dictionary import sketch_index
    from leaklab.models import ModelRef
    from leaklab.threat.observation import Observation

    grads = {"a": torch.zeros(50, 40), "b": torch.zeros(30)}
    grads["a"][::3, ::2] = 1.0
    grads["b"][:7] = 2.0
    obs = Observation(ModelRef("tiny-llama"), "fedsgd", grads, batch_size=1)
    kept = sketch_index(obs, ["a", "b"], size=200, kept_only=True)
    assert all(bool((grads[p].flatten()[i] != 0).all()) for p, i in kept.items())
    assert sum(i.numel() for i in kept.values()) == 200
    dense = sketch_index(obs, ["a", "b"], size=200)
    gen = torch.Generator(device="cpu").manual_seed(0)
    assert torch.equal(dense["a"], torch.randperm(2000, generator=gen)[: dense["a"].numel()].sort().values)


def test_adaptive_somp_reads_top_k_one_percent_from_the_kept_coordinates_end_to_end():
    """tiny-llama, B = 2, global top-k 1 %: plain SOMP finds no signal; the adaptive attacker's span check on a
    saturated fully kept block of the layer-1 group finds the batch's tokens, OMP compares the kept
    coordinates only, and the texts come back (ROUGE-1 ≥ 0.5); the block is recorded."""
    from leaklab.defenses import defended_update, make_defense
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef

    obs, secret = defended_update(
        "fedsgd", ModelRef("tiny-llama"), "rotten-tomatoes", 2, 0, [make_defense("topk", fraction=0.01)], 4, 16
    )
    assert attack_batch("somp", obs, secret, options={"budget_s": 30}).status == "no_signal"
    rec = attack_batch("somp-adaptive", obs, secret, options={"budget_s": 30})
    block = rec.info["adaptive"]["steps"][0]["kept_block"]
    assert block["tokens"] >= len({t for ids in secret.token_ids for t in ids}) - 1
    assert rec.status == "recovered" and rec.aggregate["rouge1"] >= 0.5


def test_rebuild_on_inputs_restores_a_planted_top_k_group_exactly():
    """A rank-8 group G = A X (64 × 48, X: 8 vocabulary rows) sparsified by global top-k 30 % (by magnitude):
    refit on the known inputs X from the kept entries alone, every row kept on 8 or more columns equals the
    clean row (dropped entries included) — the obvious reference is the clean group itself; a row kept on
    fewer columns still lies in X's span, and a row with nothing kept is zero."""
    from leaklab.attacks.gradient.adaptive import rebuild_on_inputs

    gen = torch.Generator().manual_seed(3)
    vocab = torch.randn(300, 48, generator=gen, dtype=torch.float64)
    x = vocab[[5, 40, 77, 120, 161, 200, 244, 290]]
    clean = torch.randn(64, 8, generator=gen, dtype=torch.float64) @ x
    cut = clean.abs().flatten().kthvalue(int(0.7 * clean.numel())).values
    kept = clean.abs() > cut
    kept[0] = False
    kept[1] = False
    kept[1, :3] = True
    sparse = torch.where(kept, clean, 0.0)
    out = rebuild_on_inputs(sparse, kept, x)
    full = kept.sum(1) >= 8
    assert int(full.sum()) > 40
    assert torch.allclose(out[full], clean[full], atol=1e-9, rtol=0)
    assert not torch.allclose(sparse[full], clean[full])  # the fit restored dropped entries
    coef = torch.linalg.lstsq(x.T, out[1].unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(coef @ x, out[1], atol=1e-9) and torch.allclose(out[1, :3], clean[1, :3], atol=1e-9)
    assert bool((out[0] == 0).all())


def test_adaptive_somp_at_top_k_half_sees_layer_1_as_exact_on_the_kept_block_tokens():
    """tiny-llama, B = 2, global top-k 50 %: with the tokens from a saturated kept block, the layer-1 group is
    refit on their span, so SOMP's layer-1 rank is the token count (the completed group was full rank, and
    the best-effort decoder then searched the 2·d nearest vocabulary tokens per position); texts recovered."""
    from leaklab.defenses import defended_update, make_defense
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef

    obs, secret = defended_update(
        "fedsgd", ModelRef("tiny-llama"), "rotten-tomatoes", 2, 0, [make_defense("topk", fraction=0.5)], 4, 16
    )
    rec = attack_batch("somp-adaptive", obs, secret, options={"budget_s": 30})
    step = rec.info["adaptive"]["steps"][0]
    assert step["kept_block"]["tokens"] == step["layer1"]["rebuilt_on_tokens"] == rec.info["rank_l1"]
    assert rec.info["rank_l1"] >= len({t for ids in secret.token_ids for t in ids}) - 1
    assert rec.status == "recovered" and rec.aggregate["rouge1"] >= 0.9


def test_kept_embedding_rows_hold_every_batch_token_under_top_k_one_percent():
    """tiny-llama, B = 2, global top-k 1 %: every token of the batch keeps at least half of its
    input-embedding gradient row (its positions' input gradients survive the cut), so ``kept_row_tokens``
    returns a superset of the batch's tokens, most-kept first — checked against a per-row count in Python."""
    from leaklab.attacks.gradient.adaptive import kept_row_tokens
    from leaklab.defenses import defended_update, make_defense
    from leaklab.models import ModelRef, load_model

    ref = ModelRef("tiny-llama")
    obs, secret = defended_update("fedsgd", ref, "rotten-tomatoes", 2, 0, [make_defense("topk", fraction=0.01)], 4, 16)
    loaded = load_model(ref)
    info, tokens = kept_row_tokens(loaded, dict(obs.gradients), 0.5)
    name = next(n for n, p in loaded.model.named_parameters() if p is loaded.adapter.embeddings.weight)
    grad = obs.gradients[name]
    slow = [v for v in range(grad.shape[0]) if sum(1 for e in grad[v].tolist() if e != 0) >= 0.5 * grad.shape[1]]
    assert sorted(tokens.tolist()) == slow and info["tokens"] == len(slow)
    assert {t for ids in secret.token_ids for t in ids} <= set(slow)
    counts = (grad[tokens] != 0).sum(1)
    assert bool((counts[:-1] >= counts[1:]).all())
