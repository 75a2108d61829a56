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
    rows_but_last,
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


def test_a_decoders_cache_without_its_last_position_gives_the_same_terms(tiny):
    from transformers import DynamicCache

    modules = block_linears(tiny)
    prefixes = _ids(tiny, 3, 6, 6)
    cands = _ids(tiny, 2, 4, 7)
    cache = DynamicCache()
    with torch.no_grad():
        tiny.model(input_ids=prefixes, past_key_values=cache, use_cache=True)  # a decoder's cache: whole prefixes
    rows = torch.tensor([2, 0])
    fast = next_token_terms(tiny, modules, prefixes[rows], cands, rows_but_last(cache, rows))
    slow = next_token_terms(tiny, modules, prefixes[rows], cands)
    assert cache.get_seq_length() == 6  # the decoder's own cache is left alone
    for n in modules:
        assert torch.allclose(fast.x[n], slow.x[n], atol=1e-5)
        assert torch.allclose(fast.delta[n], slow.delta[n], atol=1e-5, rtol=1e-4)


def test_somp_decoder_re_ranks_unsure_shortlists_by_the_kfac_evidence_only_when_asked(monkeypatch):
    """Pool regime on tiny-llama (T > d): with ``prefix_rescore`` the first choice of every re-ranked prefix is
    the shortlist's best by score − w·z(cos), the cosines recomputed here from scratch (no cache); with no unsure
    position (every prefix shorter than ``prefix_min``) the decoder's output is the default's."""
    from leaklab.attacks.gradient.dager import SpanModel
    from leaklab.attacks.gradient.somp import PrefixRerank, SompAttack, SompOptions, span_beam_decode
    from leaklab.models import ModelRef
    from leaklab.threat import client_update

    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 16, 0, 8, 32)
    spans = SpanModel(obs)
    assert spans.full_rank and not spans.l1_exact
    tokens = SompAttack().token_set(spans)
    base = SompOptions(max_len=3, beam=2, budget_s=120)
    default = span_beam_decode(spans, tokens, len(secret.texts), base, prior=True)
    calls = []
    real = PrefixRerank.__call__

    def record(self, seqs, toks, short, both, cache):
        rank = real(self, seqs, toks, short, both, cache)
        calls.append((seqs.clone(), short.clone(), both.clone(), rank))
        return rank

    monkeypatch.setattr(PrefixRerank, "__call__", record)
    stats = {}
    opts = SompOptions(
        max_len=3, beam=2, budget_s=120, prefix_rescore=1e3, prefix_first=2, prefix_margin=0.5, prefix_min=1
    )
    found = span_beam_decode(spans, tokens, len(secret.texts), opts, prior=True, stats=stats)
    assert found and stats["prefix_rescore"]["rows"] > 0 and stats["prefix_rescore"]["modules"] == 14
    rescorer = PrefixRerank(spans, opts).rescorer
    checked = 0
    for seqs, short, both, rank in calls:
        ordered = both.gather(1, torch.argsort(both, dim=1))
        unsure = (ordered[:, 1] - ordered[:, 0] < 0.5) | (seqs.shape[1] <= 2)
        for i in torch.nonzero(unsure).flatten().tolist()[:3]:
            cos = rescorer.cosines(seqs[i : i + 1], tokens[short[i : i + 1]])[0]
            z = (cos - cos.mean()) / cos.std()
            assert int(rank[i, 0]) == int(torch.argmin(both[i] - 1e3 * z)), (seqs.shape, i)
            checked += 1
        for i in torch.nonzero(~unsure).flatten().tolist():
            assert torch.equal(rank[i], torch.argsort(both[i]))
    assert checked >= 3
    quiet = SompOptions(max_len=3, beam=2, budget_s=120, prefix_rescore=1e3, prefix_margin=1e9, prefix_min=99)
    same = span_beam_decode(spans, tokens, len(secret.texts), quiet, prior=True)
    assert [f.ids for f in same] == [f.ids for f in default]
