"""OMP against a reference least-squares solution, the gradient dictionary against the victim's gradient,
and SOMP end to end."""

import dataclasses

import numpy as np
import pytest
import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.dager import Found, SpanModel
from leaklab.attacks.gradient.dictionary import (
    observed_vector,
    sentence_gradients,
    signal_params,
    sketch_index,
)
from leaklab.attacks.gradient.omp import least_squares, omp, refine_swaps
from leaklab.attacks.gradient.somp import (
    FullRankChecks,
    NextTokenEvidence,
    SompAttack,
    SompOptions,
    model_samples,
    robust_z,
    sentence_final,
    whitener,
    with_last_alternatives,
)
from leaklab.core import parse_pairs
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import score as score_recovery
from leaklab.models import ModelRef, load_model
from leaklab.threat import ThreatFlags, client_update, fedsgd_update


def test_least_squares_matches_numpy():
    rng = np.random.default_rng(0)
    atoms, target = rng.normal(size=(4, 50)), rng.normal(size=50)
    ref = np.linalg.lstsq(atoms.T, target, rcond=None)[0]
    np.testing.assert_allclose(least_squares(torch.tensor(atoms), torch.tensor(target)).numpy(), ref, atol=1e-10)


def test_omp_recovers_a_sparse_mix_and_refits_against_the_original_target():
    rng = np.random.default_rng(1)
    atoms = rng.normal(size=(40, 200))
    true = [3, 17, 29]
    target = atoms[true].T @ np.array([0.5, 1.0, 0.8])
    res = omp(torch.tensor(atoms), torch.tensor(target), max_atoms=3)
    assert sorted(res.selected) == true
    ref = np.linalg.lstsq(atoms[res.selected].T, target, rcond=None)[0]
    np.testing.assert_allclose(res.coef.numpy(), ref, atol=1e-8)
    assert res.residual_norms[-1] < 1e-8
    free = omp(torch.tensor(atoms), torch.tensor(target))  # unknown count: residual rule stops at 3
    assert sorted(free.selected) == true and free.stop == "residual below tol"


def test_omp_stops_on_no_gain_with_noise_and_swaps_within_groups():
    rng = np.random.default_rng(2)
    atoms = rng.normal(size=(30, 300))
    target = atoms[[1, 2]].T @ np.array([1.0, 1.0]) + 0.01 * rng.normal(size=300)
    res = omp(torch.tensor(atoms), torch.tensor(target))
    assert sorted(res.selected) == [1, 2] and res.stop == "no gain"
    # the wrong alternative of a group gets swapped for the right one
    groups = list(range(30))
    groups[5] = groups[1]
    from leaklab.attacks.gradient.omp import OmpResult

    fixed = refine_swaps(torch.tensor(atoms), torch.tensor(target), OmpResult([5, 2], torch.zeros(2)), groups)
    assert sorted(fixed.selected) == [1, 2]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_dictionary_atoms_sum_to_the_observed_gradient(name):
    loaded = load_model(name)
    texts = ["The movie was a total waste of time.", "A gorgeous, witty and moving film."]
    obs, secret = fedsgd_update(ModelRef(name), texts)
    index = sketch_index(obs, signal_params(loaded))
    atoms = sentence_gradients(loaded, [list(t) for t in secret.token_ids], None, index)
    n_targets = sum(len(t) - 1 for t in secret.token_ids)  # mean next-token loss over all targets
    m = observed_vector(obs, index, torch.device("cpu"))
    assert float((atoms.double().sum(0) / n_targets - m).norm() / m.norm()) < 1e-5


@pytest.mark.parametrize("batch_size", [1, 3])
def test_somp_exact_on_tiny_llama(batch_size):
    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", batch_size, 3, 8, 24)
    rec = run_attack(make_attack("somp"), obs)
    assert score_recovery(obs, secret, rec)["aggregate"]["rouge1"] == 1.0


def test_somp_without_batch_size_uses_the_residual_rule():
    obs, secret = client_update(
        ModelRef("tiny-llama"), "rotten-tomatoes", 2, 5, 8, 24, ThreatFlags(batch_size_known=False)
    )
    assert obs.batch_size is None
    rec = run_attack(make_attack("somp"), obs)
    assert len(rec.texts) == 2 and rec.info["batch_size_estimate"] == 2
    assert score_recovery(obs, secret, rec)["aggregate"]["rouge1"] == 1.0


@pytest.mark.real
@pytest.mark.parametrize("attack", ["somp", "dager"])
def test_smollm2_batch_of_two_short_texts_recovered(attack):
    obs, secret = client_update(ModelRef("smollm2-135m"), "rotten-tomatoes", 2, 0, 8, 32)
    rec = run_attack(make_attack(attack), obs)
    agg = score_recovery(obs, secret, rec)["aggregate"]
    assert agg["rouge1"] == 1.0 and agg["rouge2"] == 1.0


def test_loop_blocking_and_robust_outlier_score():
    from leaklab.attacks.gradient.somp import _loops, robust_z

    tokens = torch.tensor([5, 6, 7])
    seqs = torch.tensor([[5, 5, 5, 5, 5], [5, 6, 7, 5, 6], [7, 6, 5, 6, 7]])
    blocked = _loops(seqs, tokens)
    # a run of one token cannot grow; "5 6 7 5 6" + 7 would repeat "5 6 7"; "... 6 7" was never followed
    assert blocked.tolist() == [[True, False, False], [False, False, True], [False, False, False]]
    z = robust_z(torch.tensor([[0.0, 0.0, 0.0, 1.0, -1.0, -9.0]]))
    assert z.argmax().item() == 5 and z[0, 5] > 5 * z[0, 4]


def test_somp_full_rank_layer2_beats_dager_best_effort():
    """T > d on tiny-llama while the batch's distinct tokens stay below d: layer 1 exact, layer 2 full rank.
    SOMP's outlier-based decoding recovers the batch; DAGER's rank-capped best effort does not."""
    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 9, 1, 6, 20)
    assert sum(len(t) for t in secret.token_ids) > 128 > len({x for t in secret.token_ids for x in t})
    with pytest.warns(RuntimeWarning, match="full rank"):
        rec = run_attack(make_attack("somp"), obs)
    with pytest.warns(RuntimeWarning, match="full rank"):
        base = run_attack(make_attack("dager"), obs)
    somp_r1 = score_recovery(obs, secret, rec)["aggregate"]["rouge1"]
    dager_r1 = score_recovery(obs, secret, base)["aggregate"]["rouge1"]
    assert rec.info["best_effort"] and somp_r1 >= 0.9 and dager_r1 < 0.5


def test_somp_full_rank_without_mlp_gradient_uses_attention_checks():
    """An update without the layer-1 MLP gradient (e.g. LoRA on attention only) still decodes in the
    full-rank regime, through the layer-2 attention check alone; DAGER's best-effort texts join the atoms."""
    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 9, 1, 6, 20)
    mlp = {p.param for p in load_model(obs.model).adapter.mlp_inputs(0).projections}
    grads = {k: v for k, v in obs.gradients.items() if k not in mlp}
    view = dataclasses.replace(obs, gradients=grads)
    spans = SpanModel(view)
    checks = FullRankChecks(spans, SompAttack().token_set(spans), 12)
    assert checks.mlp is None
    with pytest.warns(RuntimeWarning, match="full rank"):
        rec = run_attack(make_attack("somp", budget_s=60), view)
    assert rec.info["best_effort_atoms"] > 0
    assert score_recovery(view, secret, rec)["aggregate"]["rouge1"] >= 0.5


def test_attack_options_parse_and_unknown_option_is_refused():
    attack = make_attack("somp", parse_pairs(["beam=4", "budget_s=1.5", "best-effort-atoms=false"]))
    assert (attack.opts.beam, attack.opts.budget_s, attack.opts.best_effort_atoms) == (4, 1.5, False)
    assert attack.config.changed() == {"beam": 4, "budget_s": 1.5, "best_effort_atoms": False}
    with pytest.raises(LeaklabError, match="key=value"):
        parse_pairs(["beam"])
    with pytest.raises(LeaklabError, match="attack 'somp' has no option 'bogus'; valid: tau1, tau2, max_len"):
        make_attack("somp", bogus=1)
    with pytest.raises(LeaklabError, match="option 'beam': expected an integer, got 'four'"):
        make_attack("somp", {"beam": "four"})


def test_next_token_evidence_matches_a_per_prefix_reference_and_sentence_ends_are_found():
    """The KV-cached evidence (cache rows re-selected like a beam) equals recomputing every prefix in full."""
    obs, _ = fedsgd_update(ModelRef("tiny-llama"), ["the cat sat on the mat.", "It ran away! Why?"])
    spans = SpanModel(obs)
    loaded = spans.loaded
    tok = loaded.tokenizer
    tokens = torch.tensor(sorted({*tok.encode(" the cat sat. It ran! Why?", add_special_tokens=False)}))
    ev = NextTokenEvidence(spans, tokens, samples=10, sample_len=6)
    head = loaded.model.get_output_embeddings()
    grad = obs.gradients[next(n for n, p in loaded.model.named_parameters() if p is head.weight)].double()[tokens]
    seqs = torch.tensor([tok.encode(t, add_special_tokens=False)[:2] for t in ("a dog ran off", "we saw it go")])

    def reference(rows):
        """log p over the token set, full logits and the lm_head input at the last position, per prefix."""
        captured = []
        hook = head.register_forward_pre_hook(lambda _m, a: captured.append(a[0][0, -1].double()))
        with torch.no_grad():
            logits = torch.stack([loaded.model(r.view(1, -1)).logits[0, -1].double() for r in rows])
        hook.remove()
        return logits[:, tokens].log_softmax(1), logits, torch.stack(captured)

    # the background from the model's own samples: Σ_t p_t(v) h_t over every sampled position but the last,
    # recomputed one sample and one position at a time (the attack batches 8 samples per forward)
    samples = model_samples(loaded, 10, 6, 0)
    assert samples.shape == (10, 7)
    bg_sum, count = torch.zeros_like(grad), 0
    for row in samples:
        for t in range(1, row.numel()):
            _, logits, h = reference(row[:t].view(1, -1))
            bg_sum += torch.softmax(logits[0], 0)[tokens].view(-1, 1) * h
            count += 1
    torch.testing.assert_close(ev.bg_sum, bg_sum)
    assert ev.bg_count == count == 60

    ev.step(seqs[:, :1])  # position 0 of both rows
    _, logits, h = reference(seqs[:, :1])
    bg_sum, count = bg_sum + torch.softmax(logits, 1)[:, tokens].T @ h, count + 2
    for parents, extra in ((torch.tensor([0, 1]), None), (torch.tensor([1, 1, 0]), torch.tensor([[5], [9], [7]]))):
        ev.select(parents)
        seqs = seqs[parents] if extra is None else torch.cat([seqs[parents], extra], dim=1)
        logp, out_z = ev.step(seqs)
        ref, logits, h = reference(seqs)
        torch.testing.assert_close(logp, ref)
        bg_sum, count = bg_sum + torch.softmax(logits, 1)[:, tokens].T @ h, count + h.shape[0]
        resid = grad - bg_sum / count  # the row minus E[p(v) h] over every position seen so far
        cos = (h @ resid.T) / (h.norm(dim=1, keepdim=True) * resid.norm(dim=1))
        torch.testing.assert_close(out_z, robust_z(cos), rtol=1e-4, atol=1e-4)
    ends = sentence_final(loaded, tokens)
    words = [tok.decode([t]).strip() for t in tokens.tolist()]
    assert {w for w, e in zip(words, ends.tolist(), strict=True) if e} == {w for w in words if w[-1:] in ".!?"}
    assert ends.any() and not ends.all()


def test_norm_knee_finds_the_batch_token_count_like_a_brute_force_scan():
    from leaklab.attacks.gradient.somp import norm_knee

    gen = torch.Generator().manual_seed(0)
    for present in (300, 777, 1400):
        inside = torch.exp(-3 - 0.3 * torch.rand(present, generator=gen) - torch.linspace(0, 1, present))
        outside = torch.exp(-7 - torch.linspace(0, 2, 6000))
        norms = torch.cat([outside[:3000], inside, outside[3000:]])[torch.randperm(present + 6000, generator=gen)]
        knee = norm_knee(norms, 288, 4608)
        logs = sorted((float(v) for v in norms.log()), reverse=True)
        brute = max(range(288, 4608), key=lambda r: logs[r] - logs[r + 64]) + 32  # steepest 64-rank drop
        assert knee == brute and abs(knee - present) <= 32


def test_a_capped_dictionary_drops_runner_up_last_tokens_before_any_text():
    """With room for n atoms and n texts, every text keeps exactly its best completion; with room to spare,
    runners-up come back; with no cap, the same as a large room."""
    texts = ["the cat sat on the mat", "a dog ran off", "we saw it go", "my hat is red"]
    obs, _ = fedsgd_update(ModelRef("tiny-llama"), texts)
    spans = SpanModel(obs)
    prefixes = [Found(spans.loaded.encode(t)[:-1], 0.0) for t in texts]
    free = with_last_alternatives(spans, prefixes, 6)
    assert len(free) > len(texts)  # random-init model: runners-up score close to the best
    assert with_last_alternatives(spans, prefixes, 6, room=10**6) == free
    tight = with_last_alternatives(spans, prefixes, 6, room=len(texts))
    assert [f.ids[:-1] for f in tight] == [f.ids for f in prefixes]
    assert [f.ids for f in tight] == [next(g.ids for g in free if g.ids[:-1] == f.ids) for f in prefixes]
    middle = with_last_alternatives(spans, prefixes, 6, room=len(texts) + 2)
    assert len(texts) <= len(middle) <= len(texts) + 2 and {tuple(f.ids[:-1]) for f in middle} == {
        tuple(f.ids) for f in prefixes
    }


def test_swap_refinement_replaces_a_near_duplicate_and_matches_the_best_subset():
    """Greedy OMP takes a truncated copy of a true text (it correlates best with the whole target) and then
    fills the other slots; the swap search ends on the best subset of an exhaustive search (the reference)."""
    import itertools

    from leaklab.attacks.gradient.omp import OmpResult

    rng = np.random.default_rng(3)
    true = rng.normal(size=(4, 200))
    target = true.sum(0)
    near = 0.85 * true[0] + 0.6 * true[1] + 0.3 * rng.normal(size=200)  # greedy takes this near-duplicate first
    decoys = rng.normal(size=(6, 200))
    atoms = torch.tensor(np.vstack([true, near, decoys]))
    groups = list(range(atoms.shape[0]))
    greedy = omp(atoms, torch.tensor(target), max_atoms=4)
    assert greedy.selected[0] == 4  # the near-duplicate is the first pick
    fixed = refine_swaps(atoms, torch.tensor(target), greedy, groups)

    def rel(sel):
        d = atoms[list(sel)].double()
        return float((torch.tensor(target) - d.T @ least_squares(d, torch.tensor(target))).norm())

    best = min(itertools.combinations(range(atoms.shape[0]), 4), key=rel)
    assert sorted(fixed.selected) == sorted(best) == [0, 1, 2, 3]
    assert fixed.residual_norms[-1] < 1e-8
    # one text per group: an atom of an already represented group never joins
    groups[0] = groups[1]
    fixed = refine_swaps(atoms, torch.tensor(target), OmpResult([4, 1, 2, 3], torch.zeros(4)), groups)
    assert 0 not in fixed.selected


def test_last_tokens_are_rechosen_with_only_the_chosen_prefixes_as_the_batch():
    texts = ["the cat sat on the mat", "a dog ran off fast", "we saw it go home"]
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), texts)
    spans = SpanModel(obs)
    true = [list(t) for t in secret.token_ids]
    wrong = [Found(t[:-1] + [(t[-1] + 7) % 500], 0.0, True, {"prefix": len(t) - 1}) for t in true]
    attack = SompAttack()
    got, info = attack.rechoose_last_tokens(spans, wrong, {"omp_residual": 1.0, "dictionary": 3})
    assert sorted(f.ids for f in got) == sorted(true) and info["last_token_pass"] == "rechosen"
    assert info["omp_residual"] < 1e-4 and info["dictionary"] == 3
    # a second pass that fits worse than the first keeps the first choice
    got, info = attack.rechoose_last_tokens(spans, wrong, {"omp_residual": 0.0, "dictionary": 3})
    assert [f.ids for f in got] == [f.ids for f in wrong] and info["last_token_pass"] == "kept"
    # texts without a recorded prefix (e.g. DAGER's best-effort atoms) are left alone
    plain = [Found(t, 0.0) for t in true]
    assert attack.rechoose_last_tokens(spans, plain, {"omp_residual": 1.0}) == (plain, {"omp_residual": 1.0})


def test_explaining_away_subtracts_the_decoded_positions_exact_terms_and_fits_the_token_count():
    """Decoded positions' terms Σ (p_t − e_{y_t}) h_t accumulate as a per-position reference computes them; fed
    the true batch, the fitted scale α is 1/N (N: the predicted positions) and the explained rows drop to the
    rest of the gradient."""
    texts = ["the cat sat on the mat and then it ran away", "we saw a dog go by the old red barn today"]
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), texts)
    spans = SpanModel(obs)
    loaded = spans.loaded
    head = loaded.model.get_output_embeddings()
    tokens = torch.arange(head.weight.shape[0])  # every token: the rows are the whole output gradient
    ev = NextTokenEvidence(spans, tokens, samples=4, sample_len=4)
    assert torch.equal(ev.expected(), ev.background())  # nothing decoded yet
    ids = [list(t) for t in secret.token_ids]
    n = min(len(t) for t in ids)
    seqs = torch.tensor([t[:1] for t in ids])
    ref_dec = torch.zeros_like(ev.rows)
    for p in range(1, n):
        ev.step(seqs)
        captured = []
        hook = head.register_forward_pre_hook(lambda _m, a, out=captured: out.append(a[0][:, -1].double()))
        with torch.no_grad():
            logits = loaded.model(seqs).logits[:, -1].double()
        hook.remove()
        h = captured[0]
        nxt = torch.tensor([t[p] for t in ids])
        ref_dec += torch.softmax(logits, 1).T @ h
        ref_dec.index_add_(0, nxt, -h)
        ev.select(torch.arange(len(ids)), nxt)  # token ids are columns: the token set is the whole vocabulary
        seqs = torch.cat([seqs, nxt.view(-1, 1)], dim=1)
    torch.testing.assert_close(ev.decoded, ref_dec, rtol=1e-4, atol=1e-5)  # KV cache vs full forward (float32)
    assert ev.n_decoded == len(ids) * (n - 1)
    assert len({len(t) for t in ids}) == 1  # every predicted position decoded: N = n_decoded
    alpha = float((ev.rows * ev.decoded).sum() / (ev.decoded**2).sum())
    assert abs(alpha * ev.n_decoded - 1) < 0.2
    resid = (ev.rows - ev.expected()).norm() / ev.rows.norm()
    assert resid < (ev.rows - ev.background()).norm() / ev.rows.norm()


def test_whitener_is_the_inverse_square_root_of_the_ridged_second_moments():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.01, 30, 12, dtype=torch.float64)
    m = x.T @ x / 300
    w = whitener(m, 1e-3)
    ridged = m + 1e-3 * torch.linalg.eigvalsh(m).max() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(w, w.T)
    torch.testing.assert_close(w @ ridged @ w, torch.eye(12, dtype=torch.float64))  # reference: the formula
    torch.testing.assert_close(w @ w, torch.linalg.inv(ridged))


def test_whitened_filter_is_the_cosine_in_the_whitened_metric_and_first_positions_are_capped():
    """``step``'s z against a reference computed from the rows, the background and a full forward in the
    whitened metric; at a text's first position (no BOS) the z of each row is capped at its n-th best value."""
    texts = ["the cat sat on the mat and then it ran away", "we saw a dog go by the old red barn today"]
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), texts)
    spans = SpanModel(obs)
    loaded = spans.loaded
    head = loaded.model.get_output_embeddings()
    tokens = torch.arange(head.weight.shape[0])
    ev = NextTokenEvidence(spans, tokens, samples=8, sample_len=8, whiten=1e-3)
    plain = NextTokenEvidence(spans, tokens, samples=8, sample_len=8)
    assert ev.white is not None and plain.white is None
    ids = torch.tensor([list(t)[:4] for t in secret.token_ids])
    _, z0 = ev.step(ids[:, :1])
    top = torch.topk(z0, 2, dim=1).values
    assert torch.equal(top[:, 0], top[:, 1])  # 2 rows: the best two tie at the cap
    assert int((z0 == z0.max(dim=1, keepdim=True).values).sum(dim=1).min()) >= 2
    for p in range(1, 3):  # later positions: no cap, the whitened cosine
        ev.select(torch.arange(2))  # no columns: nothing counts as decoded, expected() is the background
        _, z = ev.step(ids[:, : p + 1])
    captured = []
    hook = head.register_forward_pre_hook(lambda _m, a, out=captured: out.append(a[0][:, -1].double()))
    with torch.no_grad():
        loaded.model(ids[:, :3])
    hook.remove()
    h = captured[0] @ ev.white
    resid = (ev.rows - ev.background()) @ ev.white
    cos = (h @ resid.T) / h.norm(dim=1, keepdim=True) / resid.norm(dim=1)
    torch.testing.assert_close(z, robust_z(cos), rtol=1e-3, atol=1e-3)
    # the plain filter on the same rows differs: the metric matters
    _, zp = plain.step(ids[:, :1])
    assert not torch.allclose(zp, z0)


def test_pool_regime_decoder_rescores_shortlists_with_both_span_checks_only_when_asked(monkeypatch):
    """Full-rank pool regime (T > d on tiny-llama, d = 128): the decoder runs with the output-gradient filter,
    and ``full_weight`` > 0 re-scores every step's shortlists with the layer-2 check (off: only the first
    position's start tokens use it)."""
    from leaklab.attacks.gradient.somp import SompOptions, span_beam_decode

    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 16, 0, 8, 32)
    spans = SpanModel(obs)
    assert spans.full_rank and not spans.l1_exact  # more distinct tokens than d: the output-gradient pool
    texts = secret.texts
    tokens = SompAttack().token_set(spans)
    calls = []
    real = FullRankChecks.full
    monkeypatch.setattr(FullRankChecks, "full", lambda self, *a: calls.append(1) or real(self, *a))
    counts = {}
    for weight in (0.0, 1.0):
        calls.clear()
        opts = SompOptions(max_len=5, full_weight=weight, beam=2, budget_s=120)
        found = span_beam_decode(spans, tokens, len(texts), opts, prior=True)
        assert found and all(len(f.ids) >= 1 for f in found)
        counts[weight] = len(calls)
    assert counts[0.0] == 1 and counts[1.0] > 1


def test_pool_regime_decoder_branches_at_the_second_token_only_when_asked():
    """``branch_second`` = m keeps m second tokens per start token (the outlier test, made unreachable here by
    end_z, would keep only one), and every later position keeps one extension per prefix."""
    from leaklab.attacks.gradient.somp import SompOptions, span_beam_decode

    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 16, 0, 8, 32)
    spans = SpanModel(obs)
    assert spans.full_rank and not spans.l1_exact
    tokens = SompAttack().token_set(spans)
    for m in (1, 3):
        opts = SompOptions(max_len=4, beam=4, end_z=1e9, branch_second=m, budget_s=120)
        found = span_beam_decode(spans, tokens, len(secret.texts), opts, prior=True)
        seconds, thirds = {}, {}
        for f in found:
            if len(f.ids) >= 2:
                seconds.setdefault(f.ids[0], set()).add(f.ids[1])
            if len(f.ids) >= 3:
                thirds.setdefault(tuple(f.ids[:2]), set()).add(f.ids[2])
        assert seconds and all(len(v) == m for v in seconds.values())
        assert all(len(v) == 1 for v in thirds.values())


@pytest.mark.real
@pytest.mark.parametrize("attack", ["somp", "dager"])
def test_gpt2_arch_and_minilm_classify_batches_of_two_recovered(attack):
    """The other packaged families: GPT-2 (learned positions, fused QKV) and a BERT encoder on ``classify``.
    minilm seed 1 holds texts of 8 and 13 tokens: a stray candidate kept the shorter length hidden before the
    confident-count rule of :func:`encoder_lengths`."""
    for ref, seeds in ((ModelRef("gpt2-arch"), (0,)), (ModelRef("minilm-l6", "classify"), (0, 1))):
        for seed in seeds:
            obs, secret = client_update(ref, "rotten-tomatoes", 2, seed, 8, 16)
            rec = run_attack(make_attack(attack), obs)
            assert score_recovery(obs, secret, rec)["aggregate"]["rouge1"] == 1.0, (ref.name, seed, rec.texts)


def test_somp_pool_option_ranks_the_full_rank_token_pool():
    from leaklab.attacks.gradient.somp import SompAttack, output_pool
    from leaklab.attacks.gradient.subspace import candidate_inputs, headwise_scores
    from leaklab.errors import UnknownNameError

    obs, secret = client_update(ModelRef("tiny-llama"), "rotten-tomatoes", 16, 0, 20, 24)
    spans = SpanModel(obs)
    assert not spans.l1_exact  # more distinct tokens than d = 128: the layer-1 span is full
    size = 2 * spans.adapter.hidden_size
    scores = headwise_scores(obs, spans.adapter, candidate_inputs(spans.adapter, spans.vocab, 0))
    assert torch.equal(SompAttack(SompOptions(pool="headwise")).token_set(spans), torch.topk(scores, size).indices)
    assert torch.equal(SompAttack(SompOptions(pool="span")).token_set(spans), spans.candidates(0, 0.0, topk=size))
    assert torch.equal(SompAttack().token_set(spans), output_pool(spans))
    # the head-wise ranking puts the batch's tokens above chance (a random pool of this size holds ~1 %)
    true = torch.tensor(sorted({t for ids in secret.token_ids for t in ids}))
    assert float(torch.isin(true, SompAttack(SompOptions(pool="headwise")).token_set(spans)).float().mean()) > 0.1
    with pytest.raises(UnknownNameError, match="valid: headwise, output, span"):
        make_attack("somp", pool="nope")
