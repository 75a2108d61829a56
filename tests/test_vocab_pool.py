"""Vocabulary-wide work restricted to a token pool, held against the vocabulary-wide reference on tiny models;
the update's finiteness check by one reduction."""

import pytest
import torch

from leaklab.attacks.gradient import dager
from leaklab.attacks.gradient.dager import SpanModel, full_scores, last_token_terms, pooled_scores
from leaklab.attacks.gradient.somp import LAST_MARGIN
from leaklab.errors import LeaklabError
from leaklab.models import ModelRef
from leaklab.threat import fedsgd_update

TEXTS = ["An utterly charming little comedy", "Nothing here works at all", "A slow and dull film"]


@pytest.fixture(scope="module")
def terms():
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), TEXTS)
    spans = SpanModel(obs)
    prefixes = [list(t[:-1]) for t in secret.token_ids]
    return last_token_terms(spans, prefixes), [t[-1] for t in secret.token_ids]


@pytest.mark.parametrize(("top", "start"), [(1, 64), (2, 1), (8, 64)])
def test_pooled_last_token_scores_match_the_full_vocabulary(terms, top, start):
    """What the callers keep agrees with the vocabulary-wide reference: the ``top`` best tokens of each text
    among those above LAST_MARGIN x its best (the random-init model's third text has two such tokens)."""
    terms, last = terms
    full = full_scores(terms)
    pooled = pooled_scores(terms, top, LAST_MARGIN, start=start)
    assert pooled is not None, "no pool certified"
    pool = torch.isfinite(pooled[0])
    assert 0 < int(pool.sum()) < full.shape[1] // 4  # a real restriction
    torch.testing.assert_close(pooled[:, pool], full[:, pool], rtol=1e-6, atol=1e-9)
    for got, want in zip(pooled, full, strict=True):
        assert _kept(got, top) == _kept(want, top)
    assert pooled.argmax(dim=1).tolist() == last


def test_the_attacks_use_the_pool_and_fall_back_when_none_is_certified(terms, monkeypatch):
    terms, _ = terms
    assert pooled_scores(terms, 1, start=terms.grad.shape[0]) is None  # K past a quarter of V: no pool
    assert pooled_scores(terms, 8) is None  # the noise tokens of the third text cannot be certified
    calls = []
    monkeypatch.setattr(dager, "full_scores", lambda t: calls.append(t) or full_scores(t))
    monkeypatch.setattr(dager, "pooled_scores", lambda t, top, floor: None)
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), TEXTS[:2])
    got = dager.last_tokens(SpanModel(obs), [list(t[:-1]) for t in secret.token_ids])
    assert calls and got == [t[-1] for t in secret.token_ids]


def test_check_finite_by_one_reduction():
    obs, _ = fedsgd_update(ModelRef("tiny-llama"), TEXTS[:1])
    obs.check_finite()
    name = next(iter(obs.gradients))
    for bad in (float("nan"), float("inf")):
        g = obs.gradients[name].clone()
        g.view(-1)[3] = bad
        with pytest.raises(LeaklabError, match="1 NaN/inf"):
            type(obs).check_finite(_with(obs, name, g))
    big = obs.gradients[name].clone()
    big.view(-1)[:2] = 3e38  # finite entries whose float32 sum overflows: still accepted
    type(obs).check_finite(_with(obs, name, big))


def _kept(row: torch.Tensor, top: int) -> list[int]:
    val, idx = torch.topk(row, top)
    return idx[val >= LAST_MARGIN * val[0]].tolist()


def _with(obs, name, g):
    import dataclasses

    return dataclasses.replace(obs, gradients={**obs.gradients, name: g})


def test_atoms_with_one_softmax_per_prefix_match_the_full_loss(monkeypatch):
    """Candidate-sentence gradients (OMP atoms) where last-token alternatives share their prefix's softmax
    terms equal the gradients of each atom's own loss over the whole vocabulary."""
    from leaklab.attacks.gradient import dictionary

    obs, secret = fedsgd_update(ModelRef("tiny-llama"), TEXTS[:2])
    loaded = SpanModel(obs).loaded
    index = dictionary.sketch_index(obs, dictionary.signal_params(loaded))
    base = [list(t) for t in secret.token_ids]
    sentences = [p[:-1] + [alt] for p in base for alt in (p[-1], 13, 4000)] + [base[0][:3]]
    fast = dictionary.sentence_gradients(loaded, sentences, None, index, batch=4)
    monkeypatch.setattr(dictionary, "SHARED_SOFTMAX", False)
    slow = dictionary.sentence_gradients(loaded, sentences, None, index, batch=4)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))
    assert not torch.allclose(fast[0], fast[1])  # the alternatives' atoms differ
