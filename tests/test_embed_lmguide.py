"""The LM-guided stage of the white-box inverter, on the tiny random encoder and the tiny random Llama."""

import numpy as np
import pytest
import torch

from leaklab.attacks.embedding.lmguide import LMPrior, lm_beam
from leaklab.attacks.embedding.whitebox import WhiteBoxInverter
from leaklab.encoders import load_encoder

TEXT = "too dull to enjoy funny sad great movie , a the of"


@pytest.fixture(scope="module")
def setup():
    enc = load_encoder("tiny-bert")
    ids = enc.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return enc, ids, LMPrior("tiny-llama", enc.tokenizer, ids)


def test_lm_prior_batched_first_token_scores_match_the_full_lm(setup):
    _enc, ids, prior = setup
    seqs = [ids[:3], [], ids[5:6], ids[2:9]]
    batched = prior.next_logprobs(seqs)
    for seq, row in zip(seqs, batched, strict=True):
        # reference: one unpadded sequence through the whole causal LM, last position
        full = prior.model(input_ids=torch.tensor([prior.lm_ids(seq)])).logits[0, -1]
        torch.testing.assert_close(row, torch.log_softmax(full.float(), -1), atol=1e-4, rtol=1e-4)
        # a word's score: first-token log p = exact sequence log-prob difference for one-token words
        for w in ids[:6]:
            if len(prior.pieces[w]) == 1:
                diff = prior.sequence_logprob([*seq, w]) - prior.sequence_logprob(seq)
                assert float(prior.word_logprobs(row, [w])[0]) == pytest.approx(diff, abs=1e-3)
    # the LM's own proposals are words it writes as one token, ranked by its next-token distribution
    words = prior.proposals(batched[0], [], k_lm=3, k_ev=0)
    assert words and all(len(prior.pieces[w]) == 1 for w in words)
    lp = prior.word_logprobs(batched[0], words)
    assert torch.all(lp[:-1] >= lp[1:])
    assert set(prior.proposals(batched[0], ids[:2], k_lm=0, k_ev=2)) == set(ids[:2])


def test_lm_beam_returns_the_best_scored_proposal_by_the_real_objective(setup):
    enc, ids, prior = setup
    target = torch.from_numpy(enc.embed(["too dull to enjoy"]))
    inv = WhiteBoxInverter(enc, vocab_ids=ids, candidates=4, passes=1)
    seen: list[tuple[list[int], float]] = []

    def score(seqs: list[list[int]]) -> np.ndarray:
        cos = inv.cosines(seqs, target)
        seen.extend(zip(seqs, cos - inv.penalty * np.array([len(s) for s in seqs]), strict=True))
        return cos

    seq, j = lm_beam(prior, score, ids, max_len=5, penalty=inv.penalty, beams=3, k_lm=2, k_ev=3)
    assert seq and j == pytest.approx(max(x for _, x in seen), abs=1e-6)
    assert j == pytest.approx(float(inv.objective([seq], target)[0]), abs=1e-5)


def test_lm_restart_never_lowers_the_objective(setup):
    enc, ids, prior = setup
    target = torch.from_numpy(enc.embed(["too dull to enjoy"]))
    start = ids[4:7]
    plain = WhiteBoxInverter(enc, vocab_ids=ids, candidates=4, passes=1)
    guided = WhiteBoxInverter(enc, vocab_ids=ids, candidates=4, passes=1, lm=prior, lm_budget=300, lm_opts={"beams": 3})
    s0, _ = plain.search(start, target)
    s1, c1 = guided.search(start, target)
    assert guided.objective([s1], target)[0] >= plain.objective([s0], target)[0] - 1e-6
    assert c1 == pytest.approx(float(guided.cosines([s1], target)[0]), abs=1e-6)
    # the stage itself, from any start: never returns a lower J than the one it was given
    j_start = float(guided.objective([start], target)[0])
    seq, j = guided.lm_restart(start, j_start, target, ids[:3])
    assert j >= j_start and j == pytest.approx(float(guided.objective([seq], target)[0]), abs=1e-5)
    # LM moves: the LM's next words after seq[:pos] join the proposals at pos; descent still never moves away
    moves = WhiteBoxInverter(enc, vocab_ids=ids, candidates=4, passes=1, lm=prior, lm_moves=2, lm_restart=False)
    extra = moves.lm_words(start, 1)
    assert extra == prior.proposals(prior.next_logprobs([start[:1]])[0], [], 2, 0)
    props = moves.proposals(start, 1, moves.gradient(start, target), extra)
    assert all([start[0], w, *start[1:]] in props for w in extra)
    s2, _ = moves.search(start, target)
    assert moves.objective([s2], target)[0] >= j_start - 1e-6
