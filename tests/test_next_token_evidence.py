"""The cheap next-token prefix evidence (a candidate's own terms δ_s x_sᵀ, KV-cached, batched over candidates)
against a slow reference — per candidate, plain autograd of the one loss term with the prefix's keys and values
detached, whitened explicitly — and its relation to the exact score (the exact terms' last position)."""

import pytest
import torch

from leaklab.attacks.gradient.prefix import (
    KfacMetric,
    PrefixScorer,
    block_linears,
    loss_terms,
    next_token_terms,
    weight_gradients,
)
from leaklab.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _ids(tiny, n, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny.model.config.vocab_size, (n, length), generator=gen)


def _detached_prefix_gradient(tiny, prefix, token):
    """Every block linear weight's gradient of −log p(token | prefix) by autograd over the whole prefix, with
    the keys and values of every position but the last detached (the only paths from earlier positions)."""
    model = tiny.model
    cut = prefix.shape[1] - 1

    def detach_early(_m, _a, out):
        return torch.cat([out[:, :cut].detach(), out[:, cut:]], dim=1)

    hooks = [
        m.register_forward_hook(detach_early) for n, m in model.named_modules() if n.endswith(("k_proj", "v_proj"))
    ]
    try:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=prefix).logits[0, -1].float()
        torch.nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([token])).backward()
    finally:
        for h in hooks:
            h.remove()
    out = {n: m.weight.grad.detach().clone().double() for n, m in block_linears(tiny).items()}
    model.zero_grad(set_to_none=True)
    return out


def _inv_sqrt(mat):
    evals, evecs = torch.linalg.eigh(mat.double())
    return (evecs * evals.rsqrt()) @ evecs.T


def test_next_token_cosines_match_a_detached_prefix_autograd_reference(tiny):
    modules = block_linears(tiny)
    batch = _ids(tiny, 3, 10, 1)
    every = torch.ones_like(batch, dtype=torch.bool)
    target = weight_gradients(loss_terms(tiny, modules, batch, every))
    metric = KfacMetric.from_terms(loss_terms(tiny, modules, _ids(tiny, 6, 10, 2), torch.ones(6, 10).bool()), 1e-2)
    scorer = PrefixScorer(target, metric)
    prefixes = torch.stack([batch[0, :6], batch[1, :6]])  # two prefixes of the same length, 4 candidates each
    cands = torch.cat([torch.stack([batch[0, 6], batch[1, 6]]).unsqueeze(1), _ids(tiny, 2, 3, 3)], dim=1)
    terms = next_token_terms(tiny, modules, prefixes, cands)
    cos = scorer.next_cosines(terms)
    assert cos.shape == (2, 4)
    # the fast one-position formula equals the generic scorer on the same terms
    assert torch.allclose(cos.flatten(), scorer.cosines(terms.as_terms()), atol=1e-6)
    half = {
        n: (
            _inv_sqrt(torch.linalg.inv(metric.s_inv[n].double())),
            _inv_sqrt(torch.linalg.inv(metric.a_inv[n].double())),
        )
        for n in modules
    }

    def white(grads):
        return torch.cat([(half[n][0] @ grads[n].double() @ half[n][1]).flatten() for n in modules])

    g_white = white(target)
    for i in range(2):
        for j in range(4):
            ref_grad = _detached_prefix_gradient(tiny, prefixes[i : i + 1], int(cands[i, j]))
            c_white = white(ref_grad)
            ref = float(g_white @ c_white / (g_white.norm() * c_white.norm()))
            assert abs(float(cos[i, j]) - ref) < 1e-4 * max(1.0, abs(ref)), (i, j, float(cos[i, j]), ref)
            # the terms' outer product is that gradient itself, not only its cosine
            own = {n: torch.outer(terms.delta[n][i, j], terms.x[n][i]).double() for n in modules}
            for n in modules:
                assert float((own[n] - ref_grad[n]).norm()) <= 1e-4 * float(ref_grad[n].norm()) + 1e-9, n
    assert cos.argmax(dim=1).tolist() == [0, 0]  # the batch's own next tokens stand out


def test_next_token_terms_are_the_exact_terms_last_position(tiny):
    """The exact single-token score's terms (one backward over prefix + candidate) hold the cheap terms at the
    prefix's last position; the rest (earlier positions, reached through attention) is what the cheap score
    drops, and it is not zero."""
    modules = block_linears(tiny)
    prefix = _ids(tiny, 1, 7, 4)
    cands = _ids(tiny, 1, 3, 5)
    cheap = next_token_terms(tiny, modules, prefix, cands)
    seqs = torch.cat([prefix.repeat(3, 1), cands.T], dim=1)
    target = torch.zeros_like(seqs, dtype=torch.bool)
    target[:, -1] = True
    exact = loss_terms(tiny, modules, seqs, target)
    s = prefix.shape[1]
    for n in modules:
        assert torch.allclose(exact.x[n][:, s - 1], cheap.x[n].expand(3, -1), atol=1e-5), n
        ref = exact.delta[n][:, s - 1]
        assert float((cheap.delta[n][0] - ref).norm()) <= 1e-4 * float(ref.norm()) + 1e-9, n
        assert float(exact.delta[n][:, s].abs().max()) == 0.0  # the candidate's own position has no loss
    dropped = sum(float(exact.delta[n][:, : s - 1].norm()) for n in modules)
    kept = sum(float(exact.delta[n][:, s - 1].norm()) for n in modules)
    assert dropped > 1e-3 * kept
