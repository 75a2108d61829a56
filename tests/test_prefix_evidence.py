"""Prefix evidence (FedSpy-style): prefix-gradient additivity against full-sequence autograd, the K-FAC-metric
scorer against per-candidate autograd gradients in an explicitly whitened space, and explaining away against
a direct least-squares solve."""

import pytest
import torch

from leaklab.attacks.gradient.prefix import (
    KfacMetric,
    PrefixScorer,
    block_linears,
    explain_away,
    loss_terms,
    weight_gradients,
)
from leaklab.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _ids(tiny, n, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny.model.config.vocab_size, (n, length), generator=gen)


def _autograd(tiny, ids, targets):
    """Every parameter's gradient of the summed loss over ``targets`` of one row, by plain autograd."""
    model = tiny.model
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits[:, :-1].float()
    labels = ids[:, 1:].masked_fill(~targets[:, 1:], -100)
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    ).backward()
    out = {n: p.grad.detach().clone().double() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_a_prefix_gradient_is_an_exact_additive_part_of_its_texts_gradient(tiny):
    ids = _ids(tiny, 1, 12, 0)
    k = 7
    everything = torch.ones_like(ids, dtype=torch.bool)
    whole = _autograd(tiny, ids, everything)
    prefix = _autograd(tiny, ids[:, :k], everything[:, :k])  # the text cut after its k-th token
    rest = everything.clone()
    rest[:, :k] = False
    continuation = _autograd(tiny, ids, rest)
    assert len(whole) > 10
    for name, g in whole.items():  # over all parameters, the embedding and the head included
        scale = float(g.norm()) or 1.0
        assert float((prefix.get(name, 0 * g) + continuation[name] - g).norm()) / scale < 1e-4, name
    # the batched hook capture gives the same linear-layer gradients as autograd
    modules = block_linears(tiny)
    captured = weight_gradients(loss_terms(tiny, modules, ids, rest))
    for name, g in captured.items():
        ref = continuation[name + ".weight"]
        assert float((g - ref).norm()) <= 1e-4 * float(ref.norm()) + 1e-9, name


def _inv_sqrt(mat):
    evals, evecs = torch.linalg.eigh(mat.double())
    return (evecs * evals.rsqrt()) @ evecs.T


def test_scorer_matches_a_whitened_reference_and_prefers_the_true_continuation(tiny):
    modules = block_linears(tiny)
    batch = _ids(tiny, 3, 10, 1)
    every = torch.ones_like(batch, dtype=torch.bool)
    target = weight_gradients(loss_terms(tiny, modules, batch, every))
    metric = KfacMetric.from_terms(loss_terms(tiny, modules, _ids(tiny, 6, 10, 2), torch.ones(6, 10).bool()), 1e-2)
    scorer = PrefixScorer(target, metric)
    cands = torch.cat([batch[:1, :8], _ids(tiny, 3, 8, 3)])
    cands[1:, :5] = batch[0, :5]  # the same prefix, other continuations
    cont = torch.zeros_like(cands, dtype=torch.bool)
    cont[:, 5:] = True
    cos = scorer.cosines(loss_terms(tiny, modules, cands, cont))
    # reference: each candidate's gradient by autograd, both sides whitened explicitly, S^-1/2 G A^-1/2
    half = {
        n: (
            _inv_sqrt(torch.linalg.inv(metric.s_inv[n].double())),
            _inv_sqrt(torch.linalg.inv(metric.a_inv[n].double())),
        )
        for n in modules
    }

    def white(grads, suffix=""):
        return torch.cat([(half[n][0] @ grads[n + suffix].double() @ half[n][1]).flatten() for n in modules])

    g_white = white(target)
    for i in range(cands.shape[0]):
        c_white = white(_autograd(tiny, cands[i : i + 1], cont[i : i + 1]), ".weight")
        ref = float(g_white @ c_white / (g_white.norm() * c_white.norm()))
        assert abs(float(cos[i]) - ref) < 1e-4 * max(1.0, abs(ref)), (i, float(cos[i]), ref)
    assert int(cos.argmax()) == 0  # the batch's own continuation correlates most with the batch's gradient


def test_explain_away_fits_the_known_part_by_least_squares_in_the_metric(tiny):
    modules = block_linears(tiny)
    known = weight_gradients(loss_terms(tiny, modules, _ids(tiny, 2, 8, 4), torch.ones(2, 8).bool()))
    other = weight_gradients(loss_terms(tiny, modules, _ids(tiny, 2, 8, 5), torch.ones(2, 8).bool()))
    target = {n: 0.37 * known[n] + other[n] for n in modules}
    metric = KfacMetric.from_terms(loss_terms(tiny, modules, _ids(tiny, 4, 8, 6), torch.ones(4, 8).bool()), 1e-2)
    resid, alpha = explain_away(target, known, metric)
    half = {
        n: (
            _inv_sqrt(torch.linalg.inv(metric.s_inv[n].double())),
            _inv_sqrt(torch.linalg.inv(metric.a_inv[n].double())),
        )
        for n in modules
    }
    k = torch.cat([(half[n][0] @ known[n].double() @ half[n][1]).flatten() for n in modules])
    t = torch.cat([(half[n][0] @ target[n].double() @ half[n][1]).flatten() for n in modules])
    ref = torch.linalg.lstsq(k.unsqueeze(1), t.unsqueeze(1)).solution.item()
    assert alpha == pytest.approx(ref, rel=1e-4)
    assert alpha != pytest.approx(0.37, rel=1e-3)  # the other texts are not orthogonal to the known ones
    for n in modules:
        assert torch.allclose(resid[n].double(), (target[n] - ref * known[n]).double(), rtol=1e-4, atol=1e-7)
