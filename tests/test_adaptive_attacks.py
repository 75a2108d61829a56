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
