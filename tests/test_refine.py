"""Residual-verified refinement of chosen texts: the replacement residual against an explicit least-squares
refit, and the coordinate descent on a real (tiny-llama) gradient."""

from itertools import pairwise

import torch

from leaklab.attacks.gradient.dictionary import observed_vector, sentence_gradients, signal_params, sketch_index
from leaklab.attacks.gradient.refine import KfacAtoms, fit_residual, refine_texts, replacement_residuals
from leaklab.models import ModelRef, load_model
from leaklab.threat import client_update, fedsgd_update


def explicit_residual(atoms: torch.Tensor, target: torch.Tensor) -> float:
    coef = torch.linalg.lstsq(atoms.double().T, target.double().unsqueeze(1), driver="gelsd").solution
    return float((target.double() - atoms.double().T @ coef.squeeze(1)).norm() / target.double().norm())


def test_replacement_residuals_equal_an_explicit_least_squares_refit():
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(6, 200, generator=gen, dtype=torch.float64)
    atoms[4] = atoms[1] * 2.0  # a rank-deficient dictionary (near-duplicate texts)
    target = atoms[:3].sum(0) + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64)
    cands = torch.randn(5, 200, generator=gen, dtype=torch.float64)
    cands[2] = atoms[0] + atoms[2]  # lies in the span of the others: explains nothing new
    for slot in (0, 3, 5, 6):  # slot 6 = k: the candidate is added
        got = replacement_residuals(atoms, target, slot, cands)
        for j in range(cands.shape[0]):
            rows = torch.cat([atoms[:slot], cands[j : j + 1], atoms[slot + 1 :]])
            assert abs(float(got[j]) - explicit_residual(rows, target)) < 1e-9
    assert abs(fit_residual(atoms, target) - explicit_residual(atoms, target)) < 1e-9


def test_residual_verified_edits_complete_a_cut_text_and_fix_a_last_token():
    """On a real tiny-llama update, two chosen texts are wrong — one cut three tokens short, one with a wrong
    last token — among offered edits that include the right ones and random ones: the refinement reaches the
    private texts and a residual near zero, and leaves the right texts alone."""
    ref = ModelRef("tiny-llama")
    obs, secret = client_update(ref, "rotten-tomatoes", 3, 1, 8, 14)
    loaded = load_model(ref)
    truth = [list(t) for t in secret.token_ids]
    index = sketch_index(obs, signal_params(loaded))
    target = observed_vector(obs, index, loaded.device)
    vocab = loaded.adapter.embeddings.num_embeddings
    gen = torch.Generator().manual_seed(1)
    wrong_last = (truth[1][-1] + 7) % vocab
    chosen = [truth[0][:-3], truth[1][:-1] + [wrong_last], truth[2]]

    def edits(text: list[int]) -> list[list[int]]:
        noise = torch.randint(0, vocab, (3,), generator=gen).tolist()
        nxt = [t[len(text)] for t in truth if t[: len(text)] == text and len(t) > len(text)]
        ends = [t[len(text) - 1] for t in truth if t[: len(text) - 1] == text[:-1]]
        return [text + [v] for v in nxt + noise] + [text[:-1] + [v] for v in ends + noise] + [text[:-1]]

    def gradients(batch: list[list[int]]) -> torch.Tensor:
        return sentence_gradients(loaded, batch, None, index)

    start = gradients(chosen)
    texts, atoms, history = refine_texts(chosen, start, target, edits, gradients, rounds=6)
    assert texts == truth
    assert history[0] > 0.05 and history[-1] < 1e-3
    assert abs(history[-1] - explicit_residual(atoms, target)) < 1e-6


def test_kfac_atoms_sum_to_the_whitened_observed_gradient_and_match_the_kfac_inner_product():
    """The whitened atoms of a batch's texts add up (÷ its target count) to the whitened observed gradient, and
    their Euclidean inner products are the K-FAC inner products tr(gᵀ S⁻¹ h A⁻¹) of the raw gradients."""
    from leaklab.attacks.gradient.prefix import KfacMetric

    loaded = load_model("tiny-llama")
    texts = ["The movie was a total waste of time.", "A gorgeous, witty and moving film."]
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), texts)
    params = signal_params(loaded)
    space = KfacAtoms(loaded, params, ridge=1e-2, samples=4, length=16)
    atoms = space([list(t) for t in secret.token_ids])
    n_targets = sum(len(t) - 1 for t in secret.token_ids)
    target = space.whiten({p: obs.gradients[p] for p in params})
    assert float((atoms.sum(0) / n_targets - target).norm() / target.norm()) < 1e-5
    inv = {n: (a @ a).float() for n, a in space.a.items()}, {n: (s @ s).float() for n, s in space.s.items()}
    metric = KfacMetric(*inv)
    raw = {p: obs.gradients[p].double() for p in params}
    want = sum(metric.inner(p.rsplit(".", 1)[0], raw[p], raw[p]) for p in params)
    assert abs(float(target @ target) / want - 1) < 1e-3


def test_somp_with_residual_verified_edits_never_raises_the_residual_and_edits_are_well_formed():
    """Full-rank tiny-llama update (T > d): with ``refine_rounds`` SOMP records the residual after each round,
    which never rises; each edit is a cut of at most ``refine_back`` tokens, or a base continued by exactly
    ``refine_lookahead`` tokens."""
    import pytest

    from leaklab.attacks.base import make_attack, run_attack
    from leaklab.attacks.gradient.dager import SpanModel
    from leaklab.attacks.gradient.somp import SompAttack, SompOptions, TextEdits

    obs, _ = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 9, 1, 6, 20)
    with pytest.warns(RuntimeWarning, match="full rank"):
        rec = run_attack(make_attack("somp", refine_rounds=2, refine_budget_s=60), obs)
    history = rec.info["refine_residual"]
    assert len(history) >= 2 and all(b <= a + 1e-9 for a, b in pairwise(history))
    spans = SpanModel(obs)
    opts = SompOptions(refine_lookahead=3, refine_back=2)
    text = rec.token_ids[0]
    edits = TextEdits(spans, SompAttack(opts).token_set(spans), opts)(text)
    cuts = [e for e in edits if len(e) < len(text)]
    assert cuts == [text[:-1], text[:-2]]
    for e in edits:
        if len(e) >= len(text):
            base = len(e) - 3
            assert len(text) - 2 <= base <= len(text) and e[:base] == text[:base]
