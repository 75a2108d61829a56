"""TAG and LAMP (optimisation baselines): the gradient distance against a hand computation, LAMP's discrete
move step against a brute-force enumeration, and both attacks end to end on tiny-llama through the runner."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import torch

from leaklab.attacks.gradient.optim import (
    Dummy,
    Matcher,
    all_moves,
    best_move,
    gradient_distance,
    sample_moves,
    setup,
)
from leaklab.experiments.runner import attack_batch
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.fedsgd import collate, gradient
from leaklab.threat.observation import Observation, ThreatFlags
from leaklab.threat.settings import client_update

TINY = ModelRef("tiny-llama")


@pytest.fixture(scope="module")
def update():
    return client_update(TINY, "rotten-tomatoes", 1, 0, 4, 10, ThreatFlags())


def test_gradient_distance_by_hand():
    """g = ([3, −4], [0]), g' = ([1, −1], [2]): diff (−2, 3 | 2); ‖·‖₂² = 17, ‖·‖₁ = 7; ‖g‖₂² = 25, ‖g‖₁ = 7,
    so D = 17/25 + 0.5 · 7/7 = 1.18."""
    obs = [torch.tensor([3.0, -4.0]), torch.tensor([0.0])]
    mine = [torch.tensor([1.0, -1.0]), torch.tensor([2.0])]
    d = gradient_distance(mine, obs, 0.5, (25.0, 7.0))
    assert float(d) == pytest.approx(17 / 25 + 0.5, abs=1e-6)


def test_tag_loss_equals_the_client_gradient_distance(update):
    """Matcher.distance on the embeddings of a token sequence equals L2²/‖g‖² + α·L1/‖g‖₁ computed from the
    victim code's own gradient of those tokens (input ids, not embeddings), in float64 by hand; and at the
    batch's true tokens the distance is ~0."""
    obs, secret = update
    loaded = load_model(TINY)
    matcher = Matcher(loaded, obs, alpha=0.3)
    emb = loaded.adapter.embeddings.weight.detach()
    for ids in ([5, 17, 300, 2, 9], list(secret.token_ids[0])):
        x = emb[torch.tensor([ids])].clone()
        labels = torch.tensor([ids])
        mine = float(matcher.distance(x, labels, torch.ones_like(labels), create_graph=False))
        theirs = gradient(loaded, collate(loaded, [ids], [0]))
        l2 = sum(float((theirs[n].double() - obs.gradients[n].double()).pow(2).sum()) for n in matcher.names)
        l1 = sum(float((theirs[n].double() - obs.gradients[n].double()).abs().sum()) for n in matcher.names)
        n2 = sum(float(obs.gradients[n].double().pow(2).sum()) for n in matcher.names)
        n1 = sum(float(obs.gradients[n].double().abs().sum()) for n in matcher.names)
        assert mine == pytest.approx(l2 / n2 + 0.3 * l1 / n1, rel=1e-4, abs=1e-6)
    assert mine < 1e-6  # the last sequence was the batch itself


def _brute_force_neighbours(rows: list[list[int]], lengths: list[int], pool: int) -> list[list[list[int]]]:
    """Every batch one move away, as row-index lists (pool token v is row −1 − v), built from the definitions:
    for each sequence, each permutation that differs from it by one transposition or is one pop/insert, and
    each insertion of a pool token (last row dropped)."""
    out = []
    for s, n in enumerate(lengths):
        seq = rows[s][:n]
        seen = []
        for perm in itertools.permutations(range(n)):
            cand = [seq[p] for p in perm]
            diff = [i for i in range(n) if perm[i] != i]
            one_swap = len(diff) == 2
            one_shift = any(
                cand == (seq[:i] + seq[i + 1 :])[:j] + [seq[i]] + (seq[:i] + seq[i + 1 :])[j:]
                for i in range(n)
                for j in range(n)
                if i != j
            )
            if (one_swap or one_shift) and cand not in seen:
                seen.append(cand)
        seen += [(seq[:j] + [-1 - v] + seq[j:])[:n] for v in range(pool) for j in range(n)]
        out += [[*rows[:s], c + rows[s][n:], *rows[s + 1 :]] for c in seen]
    return out


def test_lamp_move_step_matches_brute_force():
    """best_move over all_moves finds the same minimum as scoring every one-move neighbour built independently
    (toy: 2 sequences of lengths 4 and 3 in a width-4 batch, 2 pool tokens, a position-dependent score)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 3, generator=gen)
    table = torch.randn(2, 3, generator=gen)
    weights = torch.randn(4, 3, generator=gen)
    lengths = [4, 3]

    def score(x: torch.Tensor) -> float:
        return float((torch.tanh(x) * weights).sum() + 0.1 * x[:, :, 0].cumsum(1).pow(2).sum())

    moves = list(all_moves(lengths, 2))
    _, best, chosen = best_move(base, moves, lengths, table, score)
    rows = [[0, 1, 2, 3], [4, 5, 6, 7]]
    flat = base.reshape(8, 3)

    def build(r: list[list[int]]) -> torch.Tensor:
        return torch.stack([torch.stack([table[-1 - i] if i < 0 else flat[i] for i in seq]) for seq in r])

    reference = [score(build(r)) for r in _brute_force_neighbours(rows, lengths, 2)]
    assert len(moves) >= len(reference)  # move(i→i+1) and swap(i, i+1) coincide; the neighbour set is the same
    assert chosen is not None and best == pytest.approx(min(*reference, score(base)), abs=1e-9)
    assert len({tuple(m) for m in sample_moves(lengths, 2, 200, random.Random(1))} - set(moves)) == 0


@pytest.mark.parametrize(
    ("attack", "options", "lengths"),
    [("tag", {"steps": 15}, True), ("lamp", {"steps": 12, "every": 6, "candidates": 4}, False)],
)
def test_tag_and_lamp_recover_a_b1_text_on_tiny_llama(update, attack, options, lengths):
    """Through the runner, lengths granted (TAG) or estimated (LAMP): the recovered text is closer in gradient
    than the start and holds the batch's tokens: token F1 ≥ 0.3. ROUGE-1 is not bounded: at this budget the
    pieces glue into non-words on tiny-llama (ROUGE-1 0.0 while token F1 ~0.4; the benchmark holds the
    smollm2-135m numbers)."""
    obs, secret = update
    if lengths:
        obs = replace(obs, flags=replace(obs.flags, lengths_known=True), lengths=secret.lengths)
    loaded = load_model(TINY)
    s = setup(obs, loaded, "tokenset")
    start = Dummy(loaded, s, 1.0, 0)
    d0 = float(Matcher(loaded, obs, 0.01).distance(start.x.detach(), start.labels(), start.mask, False))
    record = attack_batch(attack, obs, secret, options=options)
    assert record.status == "recovered", record.reason
    assert record.info["grants"]["lengths"] == (
        "granted" if lengths else "estimated: leaked token set size / B, for every text"
    )
    assert record.info["lengths"] == (list(secret.lengths) if lengths else [max(2, s.pool.numel())])
    assert record.info["final_distance"] < d0
    assert record.aggregate["token_f1"] >= 0.3


def test_without_batch_size_tag_cannot_run_and_is_not_scored(update):
    obs, secret = update
    blind = Observation(obs.model, obs.setting, obs.gradients, replace(obs.flags, batch_size_known=False))
    record = attack_batch("tag", blind, secret, options={"steps": 1})
    assert record.status == "could_not_run" and "batch size is not granted" in record.reason
    assert record.aggregate is None
