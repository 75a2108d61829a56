"""Span-check maths against slow obvious references (least squares, brute force) on tiny models."""

import pytest
import torch

from leaklab.attacks.gradient.extend import RopeExtender
from leaklab.attacks.gradient.subspace import (
    Subspace,
    attention_subspace,
    extension_inputs,
    head_blocks,
    headwise_scores,
    mlp_subspace,
    numerical_rank,
    pair_module_inputs,
    row_space,
    sequence_inputs,
    span_distance,
    whitener,
)
from leaklab.models import ModelRef, load_model
from leaklab.threat import fedsgd_update

TEXTS = ["The movie was a total waste of time.", "A gorgeous, witty and moving film about love and loss."]


def lstsq_distance(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Reference: residual of the least-squares fit of x̂ by the rows (no orthonormal basis involved)."""
    xh = (x / x.norm(dim=-1, keepdim=True)).double()
    coef = torch.linalg.lstsq(rows.double().T, xh.T, driver="gelsd").solution  # SVD-based: rank-deficient ok
    return (xh.T - rows.double().T @ coef).norm(dim=0)


def test_numerical_rank_finds_gap_and_full_rank():
    torch.manual_seed(0)
    low = (torch.randn(40, 7) @ torch.randn(7, 30)).float().double()
    assert numerical_rank(torch.linalg.svdvals(low)) == 7
    assert numerical_rank(torch.linalg.svdvals(torch.randn(40, 30, dtype=torch.float64))) == 30
    assert numerical_rank(torch.zeros(5, dtype=torch.float64)) == 0


def test_numerical_rank_of_float32_matrices_with_a_smooth_signal_spectrum():
    """Signal decaying over six decades down to just above float32 round-off (like real layer-2 gradients):
    the rank is the signal's, not the count of values above a fixed floor; smooth full-rank spectra stay full."""
    torch.manual_seed(0)
    for r in (50, 200, 400):
        u = torch.linalg.qr(torch.randn(600, r, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(576, r, dtype=torch.float64))[0]
        m = ((u * torch.logspace(0, -6.4, r, dtype=torch.float64)) @ v.T).float().double()
        assert numerical_rank(torch.linalg.svdvals(m)) == r
    u = torch.linalg.qr(torch.randn(600, 576, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(576, 576, dtype=torch.float64))[0]
    full = ((u * torch.logspace(0, -5, 576, dtype=torch.float64)) @ v.T).float().double()
    assert numerical_rank(torch.linalg.svdvals(full)) == 576
    assert numerical_rank(torch.linalg.svdvals(torch.randn(700, 576).double())) == 576


def test_span_distance_matches_lstsq_reference():
    torch.manual_seed(1)
    x_in = torch.randn(6, 32, dtype=torch.float64)
    grad = torch.randn(50, 6, dtype=torch.float64) @ x_in  # rows span the 6 inputs
    basis, _, _ = row_space([grad.float()])
    assert basis.shape[0] == 6
    probes = torch.cat([x_in, torch.randn(5, 32, dtype=torch.float64)])
    fast = span_distance(probes, basis)
    ref = lstsq_distance(probes, x_in)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert fast[:6].max() < 1e-5 and fast[6:].min() > 0.1
    assert span_distance(torch.zeros(1, 32), basis).item() == 1.0  # a zero input is in no span


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_true_tokens_pass_span_check_others_fail(name):
    loaded = load_model(name)
    ad = loaded.adapter
    obs, secret = fedsgd_update(ModelRef(name), TEXTS)
    sub = attention_subspace(obs, ad, 0)
    # brute force: every (token, position) the batch actually fed to a gradient vs. random others
    true_x, fake_x = [], []
    gen = torch.Generator().manual_seed(0)
    for ids in secret.token_ids:
        x = sequence_inputs(ad, torch.tensor([ids]), 0)[0]
        true_x.append(x[:-1])  # next-token: the last token's input feeds no loss
        fake = torch.randint(1000, 20000, (len(ids) - 1,), generator=gen)
        fake = fake[~torch.isin(fake, torch.tensor(ids))]
        fake_x.append(torch.stack([ad.token_inputs(fake[i : i + 1], position=i)[0] for i in range(len(fake))]))
    true_x, fake_x = torch.cat(true_x), torch.cat(fake_x)
    assert sub.distance(true_x).max() < 1e-4
    assert sub.distance(fake_x).min() > 1e-2
    # the gradient's row space is the span of the inputs the batch really fed: same distances as lstsq on them
    torch.testing.assert_close(sub.distance(fake_x), lstsq_distance(fake_x, true_x), atol=1e-4, rtol=1e-4)


def test_query_alone_misses_the_first_token():
    name = "tiny-llama"
    ad = load_model(name).adapter
    obs, secret = fedsgd_update(ModelRef(name), TEXTS[:1])
    first = ad.token_inputs(torch.tensor(secret.token_ids[0][:1]), 0)
    assert attention_subspace(obs, ad, 0, which=("q",)).distance(first).item() > 1e-2
    assert attention_subspace(obs, ad, 0).distance(first).item() < 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_cached_extensions_equal_full_forward(name):
    ad = load_model(name).adapter
    gen = torch.Generator().manual_seed(0)
    pre, toks = torch.randint(100, 5000, (3, 5), generator=gen), torch.randint(100, 5000, (4,), generator=gen)
    fast = extension_inputs(ad, pre, toks, chunk=5)
    full = torch.cat([pre.repeat_interleave(4, 0), toks.repeat(3).view(-1, 1)], 1)
    ref = sequence_inputs(ad, full, 1)[:, -1].view(3, 4, -1)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_complement_distance_matches_basis_distance_and_capping():
    """Subspace.distance through the orthogonal complement equals the direct residual, capped or not."""
    torch.manual_seed(3)
    x_in = torch.randn(20, 24, dtype=torch.float64)
    grad = torch.randn(60, 20, dtype=torch.float64) @ x_in
    basis, s, comp = row_space([grad.float()])
    assert basis.shape[0] == 20 and comp is not None and comp.shape[0] == 4
    sub = Subspace(basis, s, 0, comp)
    probes = torch.cat([x_in, torch.randn(7, 24, dtype=torch.float64)])
    torch.testing.assert_close(sub.distance(probes), span_distance(probes, basis), atol=1e-9, rtol=0)
    cut = sub.capped(12)
    assert cut.rank == 12 and cut.complement.shape[0] == 12
    torch.testing.assert_close(cut.distance(probes), span_distance(probes, basis[:12]), atol=1e-9, rtol=0)


@pytest.mark.parametrize(("name", "n_proj"), [("tiny-llama", 2), ("tiny-gpt2", 1)])
def test_mlp_subspace_contains_the_post_attention_states(name, n_proj):
    """Layer-1 MLP input gradients span the post-attention hidden states of the batch (brute force)."""
    loaded = load_model(name)
    ad = loaded.adapter
    mlp = ad.mlp_inputs(0)
    assert len(mlp.projections) == n_proj
    obs, secret = fedsgd_update(ModelRef(name), TEXTS)
    sub = mlp_subspace(obs, ad, 0)
    inside, outside = [], []
    for ids in secret.token_ids:
        (z,) = ad.module_inputs(torch.tensor([ids]), [mlp.module])
        inside.append(z[0, :-1])  # the last position feeds no loss
        other = torch.tensor([list(reversed(ids))])
        (zo,) = ad.module_inputs(other, [mlp.module])
        outside.append(zo[0, 1:-1])
    assert sub.distance(torch.cat(inside)).max() < 1e-4
    assert sub.distance(torch.cat(outside)).min() > 1e-2


def test_fast_rope_extension_equals_the_generic_forward():
    loaded = load_model("tiny-llama")
    ad = loaded.adapter
    tokens = torch.arange(500, 560)
    ext = RopeExtender.build(ad, tokens)
    assert ext is not None
    prefixes = torch.tensor([[11, 12, 13, 14], [400, 401, 402, 403]])
    fast = ext.all_pairs(prefixes).reshape(-1, ad.hidden_size)
    rows = torch.arange(2).repeat_interleave(tokens.numel())
    (slow,) = pair_module_inputs(ad, prefixes, rows, tokens.repeat(2), [ad.mlp_inputs(0).module], 1)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    assert RopeExtender.build(load_model("tiny-gpt2").adapter, tokens) is None  # learned positions: generic path


@pytest.mark.parametrize("whiten", [False, True])
def test_headwise_scores_match_a_per_head_least_squares_reference(whiten):
    """Each head's score is 1 − (least-squares residual of the unit input on that head's gradient rows)², over
    the rank share r_h/d; the reported score is the max over heads. Checked per head against lstsq."""
    name = "tiny-llama"
    ad = load_model(name).adapter
    obs, _ = fedsgd_update(ModelRef(name), TEXTS)
    blocks = head_blocks(obs, ad, 0)
    assert len(blocks) == ad.num_heads + 2 * ad.num_kv_heads and all(b.shape[0] == ad.head_dim for *_, b in blocks)
    inputs = ad.token_inputs(torch.arange(400, 460), position=0).double()
    centred = inputs - inputs.mean(0)
    w = whitener(centred.T @ centred / len(inputs), 1e-4) if whiten else torch.eye(inputs.shape[1]).double()
    xw = inputs @ w
    ref = torch.zeros(inputs.shape[0], dtype=torch.float64)
    for *_, block in blocks:
        rows = block.double() @ w
        rank = numerical_rank(torch.linalg.svdvals(rows / rows.norm()))
        # least squares on the rows, ignoring their float32 round-off directions (below 1e-4 of the largest)
        xh = xw / xw.norm(dim=-1, keepdim=True)
        coef = torch.linalg.lstsq(rows.T, xh.T, rcond=1e-4, driver="gelsd").solution
        energy = 1 - (xh.T - rows.T @ coef).norm(dim=0).pow(2)
        ref = torch.maximum(ref, energy / (rank / inputs.shape[1]))
    torch.testing.assert_close(headwise_scores(obs, ad, inputs, whiten=whiten), ref, atol=1e-6, rtol=1e-6)


def test_screened_distance_matches_the_float64_reference():
    """The float32-screened vocabulary distance: rows near the span exact (float64), the others within float32
    round-off, and the same rows under any membership threshold."""
    from leaklab.attacks.gradient.subspace import screened_distance

    gen = torch.Generator().manual_seed(3)
    d, r = 96, 40
    basis = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0].T.contiguous()
    far = torch.randn(5000, d, generator=gen)
    inside = (torch.randn(50, r, generator=gen, dtype=torch.float64) @ basis).float()
    near = inside + 1e-2 * torch.randn(50, d, generator=gen)
    x = torch.cat([far, inside, near, torch.zeros(1, d)])
    slow = span_distance(x, basis)
    fast = screened_distance(x, basis)
    pool = slow < 0.05
    assert int(pool.sum()) >= 100
    assert torch.equal(fast[pool], slow[pool])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for tau in (1e-3, 1e-2, 0.05):
        assert torch.equal(fast < tau, slow < tau)
    assert fast[-1].item() == 1.0
