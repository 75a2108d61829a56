"""Bag-of-words inverter pieces: expected-F1 top-k, span augmentation, the forward dictionary and its decoding."""

from itertools import combinations

import numpy as np
import pytest
import torch

from leaklab.attacks.embedding.bow import BagOfWordsInverter, expected_f1_k, whitening
from leaklab.attacks.embedding.registry import save_inverter, span_augment
from leaklab.corpora import load_corpus
from leaklab.corpora.sampling import split_of
from leaklab.errors import LeaklabError


def test_expected_f1_top_k_matches_brute_force_over_subsets():
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = np.sort(rng.random(8))[::-1]
        length = float(rng.uniform(0.5, 10))
        k = expected_f1_k(s, length)
        best = max(2 * s[list(c)].sum() / (r + length) for r in range(1, 9) for c in combinations(range(8), r))
        assert 2 * s[:k].sum() / (k + length) == pytest.approx(best)
    assert expected_f1_k(np.zeros(0), 3.0) == 0


def test_whitening_is_the_inverse_square_root_of_the_shrunk_covariance():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(rng.standard_normal((50, 6)))
    cov = a.T @ a / 50
    w = whitening(cov, shrink=0.1).double()
    shrunk = cov + 0.1 * torch.trace(cov) / 6 * torch.eye(6, dtype=torch.float64)
    np.testing.assert_allclose((w @ shrunk @ w).numpy(), np.eye(6), atol=1e-5)
    np.testing.assert_allclose(w.numpy(), w.numpy().T, atol=1e-6)


def test_span_augment_keeps_to_public_words_and_skips_excluded():
    texts = ["the quick brown fox jumps over it", "a b", "one two three four five"]
    out = span_augment(texts, 6, seed=1, exclude={"quick brown fox"})
    assert out == span_augment(texts, 6, seed=1, exclude={"quick brown fox"}) != span_augment(texts, 6, seed=2)
    assert out and len(out) == len(set(out)) and not set(out) & set(texts)
    assert "quick brown fox" not in out
    for aug in out:  # each is a subsequence of the words of a text with at least 4 words
        assert any(_subsequence(aug.split(), t.split()) for t in texts if len(t.split()) >= 4)


def test_span_augment_of_real_public_texts_has_no_private_text():
    corpus = load_corpus("rotten-tomatoes")
    public = [t for t in corpus.texts if split_of(t) == "public"][:400]
    private = {t for t in corpus.texts if split_of(t) == "private"}
    short = [t for t in private if 2 <= len(t.split()) <= 5][:20]
    out = span_augment(public + [f"{t} and more words here" for t in short], 8, seed=0, exclude=private)
    assert len(out) > 2 * len(public) and not private & set(out)


def test_forward_dictionary_matches_ridge_and_nnls_decodes_exact_mixtures():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(40)]
    atoms = rng.standard_normal((40, 64)).astype(np.float32)
    bags = [list(rng.choice(40, size=int(rng.integers(2, 7)), replace=False)) for _ in range(400)]
    texts = [" ".join(vocab[j] for j in b) for b in bags]
    x = np.stack([atoms[b].mean(0) for b in bags]).astype(np.float32)
    inv = BagOfWordsInverter(64, vocab)
    inv.fit_forward(texts, torch.from_numpy(x), lam=0.5)
    c = inv._counts(texts).toarray()
    ref = Ridge(alpha=0.5, fit_intercept=False).fit(c, x.astype(np.float64))
    np.testing.assert_allclose(inv.forward.numpy(), ref.coef_.T, atol=2e-3)
    inv.fit_forward(texts, torch.from_numpy(x), lam=1e-4)
    inv.mix = 1e6  # decode by the NNLS weights alone; the length regressor is fit on the same pairs
    got = inv.invert(x[:50])
    assert np.mean([set(g.split()) == set(t.split()) for g, t in zip(got, texts[:50], strict=True)]) > 0.9


def test_bow_ef1_round_trip_and_legacy_folder(tmp_path):
    rng = np.random.default_rng(1)
    vocab = ["film", "song", "dark", "funny", "long", "slow"]
    texts = [" ".join(rng.choice(vocab, size=3)) for _ in range(60)]
    x = rng.standard_normal((60, 16)).astype(np.float32)
    inv = BagOfWordsInverter(16, vocab)
    info = inv.fit(texts, x)
    assert info["decode"] == "ef1" and "held_out_f1" in info
    inv.save(tmp_path / "bow")
    back = BagOfWordsInverter.load(tmp_path / "bow")
    assert (back.decode, back.mix, back.length_scale) == (inv.decode, inv.mix, inv.length_scale)
    assert back.invert(x[:10]) == inv.invert(x[:10])
    state = dict(inv.model.state_dict())  # an inverter saved before the forward dictionary existed
    save_inverter(tmp_path / "old", "bow", state, {"dim": 16, "vocab": vocab, "hidden": 0, "threshold": 0.3})
    old = BagOfWordsInverter.load(tmp_path / "old")
    assert old.decode == "threshold" and len(old.invert(x[:3])) == 3
    with pytest.raises(LeaklabError, match="valid: ef1, threshold"):
        BagOfWordsInverter(16, vocab, decode="beam")


def _subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(w in it for w in small)
