"""TIGER-style continuous search: the subspace residual and its gradient against the span distance and a hand
derivation, the coverage term against an explicit projection, the differentiable layer capture against the
existing one, and the threshold-free ranked decode on a real tiny batch."""

import itertools

import pytest
import torch

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.subspace import span_distance
from leaklab.attacks.gradient.tiger import (
    TigerOptions,
    ranked_decode,
    soft_layer_inputs,
    span_coverage,
    subspace_residual,
    tiger_search,
)
from leaklab.models import ModelRef, load_model
from leaklab.threat import client_update


def _basis(d: int, r: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return q.T.contiguous()


def test_residual_is_the_squared_span_distance_and_its_gradient_the_hand_formula():
    basis = _basis(12, 5, 0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    z[0] = 3.0 * basis[2] + 0.5 * basis[4]  # in the span: residual 0
    zz = z.clone().requires_grad_(True)
    res = subspace_residual(zz, basis)
    assert torch.allclose(res, span_distance(z, basis) ** 2, atol=1e-12)
    assert float(res[0].detach()) == pytest.approx(0.0, abs=1e-12)
    res.sum().backward()
    # f(z) = 1 − uᵀPu with u = z/‖z‖, P = RᵀR: ∂f/∂z = −2 (P u − (uᵀPu) u) / ‖z‖
    norm = z.norm(dim=1, keepdim=True)
    u = z / norm
    pu = u @ basis.T @ basis
    hand = -2.0 * (pu - (u * pu).sum(1, keepdim=True) * u) / norm
    assert torch.allclose(zz.grad, hand, atol=1e-12)


def test_coverage_matches_an_explicit_projection():
    basis = _basis(10, 4, 2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    xh = x / x.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(xh.T)  # orthonormal basis of the rows' span
    explicit = (1.0 - (basis @ q).pow(2).sum(1)).mean()
    assert float(span_coverage(x, basis, ridge=1e-12)) == pytest.approx(float(explicit), abs=1e-8)
    spanning = torch.cat([basis * 2.0, basis[:1] + basis[1:2]])  # rows spanning the basis, one repeated mix
    assert float(span_coverage(spanning, basis)) == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_soft_capture_equals_the_layer_inputs_of_one_hot_texts(tiny):
    adapter = tiny.adapter
    ids = torch.randint(3, tiny.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    embeds = adapter.embeddings(ids).detach().requires_grad_(True)
    x1, x2 = soft_layer_inputs(adapter, embeds, mask)
    assert torch.allclose(x1, adapter.layer_inputs(ids, 0), atol=1e-5)
    assert torch.allclose(x2, adapter.layer_inputs(ids, 1), atol=1e-5)
    x2.sum().backward()  # the graph is kept: the embeddings get a gradient
    assert embeds.grad is not None and float(embeds.grad.abs().sum()) > 0


def test_ranked_decode_recovers_a_tiny_batch_and_tiger_keeps_it():
    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 2, 0, 8, 32)
    spans = SpanModel(obs)
    dist1 = spans.layer1_distances(0).cpu()
    pool = torch.topk(dist1, 96, largest=False).indices
    lengths = list(secret.lengths)
    texts = ranked_decode(spans, pool, lengths)
    truth = sorted(list(t) for t in secret.token_ids)
    # the last token of a text is invisible to the attention gradients of a next-token update
    assert sorted(t[:-1] for t in texts) == [t[:-1] for t in truth]
    no_repeat = ranked_decode(spans, pool, lengths, repeats=False)
    assert all(a != b for t in no_repeat for a, b in itertools.pairwise(t))
    res = tiger_search(
        spans.adapter, spans.sub1.basis, spans.sub2.basis, pool, dist1[pool], lengths, TigerOptions(steps=5), 0, texts
    )
    assert sorted(t[:-1] for t in res.ids) == [t[:-1] for t in truth]
    assert res.loss_curve[-1] < 1e-3
