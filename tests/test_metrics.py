import pytest

from leaklab.metrics import match_texts, rouge_scores, score_batch, token_prf
from leaklab.metrics.text import UnicodeTokenizer


def test_rouge_hand_cases():
    # pred "the cat sat", ref "the cat sat down": P=3/3, R=3/4 -> F1 = 6/7
    r = rouge_scores("the cat sat", "the cat sat down")
    assert r["rouge1"] == pytest.approx(6 / 7)
    # bigrams: pred {the cat, cat sat}, ref {the cat, cat sat, sat down}: P=1, R=2/3 -> 0.8
    assert r["rouge2"] == pytest.approx(0.8)
    assert r["rougeL"] == pytest.approx(6 / 7)
    assert rouge_scores("A B", "a b")["rouge1"] == 1.0
    assert rouge_scores("x", "y")["rouge1"] == 0.0


def test_unicode_tokenizer_handles_cjk_and_accents():
    tok = UnicodeTokenizer()
    assert tok.tokenize("Perché non puoi?") == ["perché", "non", "puoi"]
    assert tok.tokenize("我喜欢猫") == ["我", "喜", "欢", "猫"]
    assert tok.tokenize("Hello, World-2!") == ["hello", "world", "2"]
    assert rouge_scores("我喜欢猫", "我喜欢狗")["rouge1"] == pytest.approx(0.75)


def test_token_prf_multiset():
    # pred [1,1,2,3], true [1,2,2,4]: common = min counts {1:1, 2:1} = 2 -> P=2/4, R=2/4
    assert token_prf([1, 1, 2, 3], [1, 2, 2, 4]) == pytest.approx((0.5, 0.5, 0.5))
    assert token_prf([], [1]) == (0.0, 0.0, 0.0)


def test_matching_is_one_to_one_and_order_free():
    true = ["the cat sat on the mat", "dogs bark loudly at night"]
    pred = ["dogs bark loudly at night", "the cat sat on the mat"]
    assert match_texts(pred, true) == [(1, 0), (0, 1)]
    s = score_batch(pred, true)
    assert s.rouge1 == 1.0 and s.exact_rate == 1.0


def test_repeating_the_best_guess_does_not_score():
    true = ["the cat sat on the mat", "dogs bark loudly at night"]
    s = score_batch(["the cat sat on the mat"] * 2, true)
    # one exact match, the other pairing shares no word -> mean over 2 slots
    assert s.rouge1 == pytest.approx(0.5)


def test_unmatched_items_score_zero():
    s = score_batch(["a b c"], ["a b c", "d e f", "g h i"])
    assert s.rouge1 == pytest.approx(1 / 3) and s.slots == 3
    assert [p.pred_index for p in s.pairs] == [0, None, None]
    extra = score_batch(["a b c", "zzz", "yyy", "xxx"], ["a b c"])
    assert extra.rouge1 == pytest.approx(1 / 4)


def test_token_metrics_use_ids_when_given():
    s = score_batch(["x"], ["y"], pred_ids=[[1, 2, 3]], true_ids=[[1, 2, 3]])
    assert s.token_f1 == 1.0 and s.exact_rate == 1.0 and s.rouge1 == 0.0
