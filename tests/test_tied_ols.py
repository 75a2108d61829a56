"""The two fixes the family matrix needed, each held against a slow obvious reference: the input-path gradient
of a tied head (Gemma: embedding scaled by sqrt(d)) that the last-token scores subtract, computed on an untied
copy of the model; and orthogonal least squares, against a greedy search that refits every candidate atom."""

from __future__ import annotations

import copy

import pytest
import torch
from families import build_family

from leaklab.attacks.gradient import dictionary
from leaklab.attacks.gradient.dager import SpanModel, prefix_batch, tied_input_gradient
from leaklab.attacks.gradient.omp import least_squares, ols, refine_swaps
from leaklab.models import ModelRef
from leaklab.threat.fedsgd import fedsgd_update

TEXTS = ["the cat sat on the old mat today", "a quiet evening near the river bank"]


def _untied_reference(model, ids, mask, targets) -> torch.Tensor:
    """Gradient reaching the input embedding of a copy whose head is a separate (frozen) matrix, from every
    loss term but the unknown −logit(y_b): Σ_t logsumexp_t − Σ_known logit_t(y_t), over the scored positions."""
    twin = copy.deepcopy(model)
    head = twin.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    embed = twin.get_input_embeddings()
    assert head.weight is not embed.weight
    twin.zero_grad(set_to_none=True)
    logits = twin(input_ids=ids, attention_mask=mask).logits.float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = torch.logsumexp(logits, -1)[mask.bool()].sum() - picked[targets >= 0].sum()
    (loss / mask.sum()).backward()
    return embed.weight.grad


@pytest.mark.parametrize("shared", [True, False])
def test_tied_input_gradient_matches_an_untied_copy(tmp_path, monkeypatch, shared):
    """With the per-prefix softmax cache SOMP's atoms share (shared) and from the full logits (not shared)."""
    monkeypatch.setattr(dictionary, "SHARED_SOFTMAX", shared)
    ref = ModelRef(str(build_family("gemma", tmp_path / "gemma")), "next-token")
    obs, secret = fedsgd_update(ref, TEXTS)
    spans = SpanModel(obs)
    prefixes = [list(t[:-1]) for t in secret.token_ids]
    ids, mask, targets = prefix_batch(spans, prefixes)
    got = tied_input_gradient(spans, ids, mask, targets)
    assert bool(spans.head_means) == shared  # the cache the atoms reuse
    assert len(spans.tied_inputs) == len(prefixes)
    again = tied_input_gradient(spans, ids[:1], mask[:1], targets[:1])  # from the per-prefix cache
    want_first = _untied_reference(spans.loaded.model, ids[:1], mask[:1], targets[:1])
    torch.testing.assert_close(again, want_first, rtol=1e-4, atol=1e-7)
    want = _untied_reference(spans.loaded.model, ids, mask, targets)
    assert got is not None and float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    rows = torch.unique(ids[mask.bool()])
    outside = torch.ones(got.shape[0], dtype=torch.bool)
    outside[rows] = False
    assert float(got[outside].abs().max()) == 0.0  # only the prefixes' input rows


def test_untied_head_needs_no_correction():
    obs, secret = fedsgd_update(ModelRef("tiny-bert", "classify"), ["a short text", "another one"], [0, 1])
    spans = SpanModel(obs)
    ids = torch.tensor([list(t) for t in secret.token_ids[:1]])
    assert tied_input_gradient(spans, ids, torch.ones_like(ids), -torch.ones_like(ids)) is None


def _greedy_reference(atoms: torch.Tensor, target: torch.Tensor, k: int, groups: list[int]) -> list[int]:
    selected: list[int] = []
    for _ in range(k):
        used = {groups[i] for i in selected}
        best, best_res = None, float("inf")
        for j in range(atoms.shape[0]):
            if groups[j] in used:
                continue
            sel = selected + [j]
            res = float((target - atoms[sel].T @ least_squares(atoms[sel], target)).norm())
            if res < best_res:
                best, best_res = j, res
        selected.append(best)
    return selected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ols_picks_the_atom_that_lowers_the_residual_most(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 300, generator=gen, dtype=torch.float64)
    near = base + 0.05 * torch.randn(12, 300, generator=gen, dtype=torch.float64)  # texts one token apart
    atoms = torch.cat([base, near])
    groups = list(range(12)) + list(range(12))  # each near-copy is an alternative of its text
    target = base[[1, 4, 7]].T @ torch.tensor([0.5, 1.0, -0.7], dtype=torch.float64)
    target += 0.01 * torch.randn(300, generator=gen, dtype=torch.float64)
    res = ols(atoms, target, 4, groups)
    assert res.selected == _greedy_reference(atoms, target, 4, groups)
    assert len({groups[i] for i in res.selected}) == 4
    exact_target = base[[1, 4, 7]].sum(0)
    exact = refine_swaps(atoms, exact_target, ols(atoms, exact_target, 3, groups), groups)
    assert sorted(exact.selected) == [1, 4, 7] and exact.residual_norms[-1] < 1e-6
