"""GRAB's lever (dropout masks as unknowns): the mask relaxation against the model's own dropout forward on
tiny-gpt2 (dropout 0.1 at the embeddings, attention probabilities, attention output and MLP output), the
matcher's distance at the client's masks, and the TAG option recorded (declined where it has nothing to do)."""

from __future__ import annotations

import pytest
import torch

from leaklab.attacks.gradient.dropout import FixedMasks, RecordMasks, RelaxedMasks, dropout_forward
from leaklab.attacks.gradient.optim import Matcher
from leaklab.experiments.runner import attack_batch
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.observation import Observation, ThreatFlags
from leaklab.threat.settings import client_update

GPT2 = ModelRef("tiny-gpt2")
TEXTS = ("the movie was a delight from start to end", "a dull and tired remake")


def _batch(loaded):
    ids = [loaded.encode(t) for t in TEXTS]
    width = min(len(t) for t in ids)
    return torch.tensor([t[:width] for t in ids])


def _param_grads(model, ids, mode=None) -> list[torch.Tensor]:
    """∇θ of the mean next-token loss of ``ids`` under ``mode`` (a dropout-site mode or none)."""
    model.zero_grad(set_to_none=True)
    if mode is None:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with mode:
            loss = model(input_ids=ids, labels=ids).loss
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))


def test_client_masks_replayed_reproduce_the_models_own_dropout_forward_and_gradient():
    """The model's own train-mode forward (its RNG draws the masks) is the reference. Replaying the recorded
    masks, as fixed masks or as relaxed masks saturated at them, gives the same gradient; the relaxation at
    its start (m = 1 − p) gives the eval gradient, which is far from the dropout one."""
    loaded = load_model(GPT2)
    model, ids = loaded.model, _batch(loaded)
    with dropout_forward(model):
        torch.manual_seed(7)
        reference = _param_grads(model, ids)
        torch.manual_seed(7)
        rec = RecordMasks()
        recorded = _param_grads(model, ids, rec)
        replayed = _param_grads(model, ids, FixedMasks(rec.masks))
        relaxed = RelaxedMasks()
        start = _param_grads(model, ids, relaxed)
        with torch.no_grad():
            for theta, m in zip(relaxed.logits, rec.masks, strict=True):
                theta.copy_(torch.where(m > 0, 40.0, -40.0))
        saturated = _param_grads(model, ids, relaxed)
    evaluated = _param_grads(model, ids)
    assert not model.training and model.config._attn_implementation == "sdpa"  # restored
    assert len(rec.masks) == 1 + 3 * 2 and set(rec.rates) == {0.1}  # embeddings + 3 sites per block
    dropped = sum(float((1 - m).sum()) for m in rec.masks) / sum(m.numel() for m in rec.masks)
    assert 0.05 < dropped < 0.2
    assert _max_rel(recorded, reference) == 0.0
    assert _max_rel(replayed, reference) < 1e-5
    assert _max_rel(saturated, reference) < 1e-5
    assert _max_rel(start, evaluated) < 1e-5
    assert _max_rel(evaluated, reference) > 0.05


def test_matcher_distance_vanishes_at_the_true_tokens_only_with_the_clients_masks():
    """An update computed with dropout on: D at the true embeddings is ~0 with the client's masks in the
    matcher and clearly positive in eval mode (what plain TAG matches against)."""
    loaded = load_model(GPT2)
    model, ids = loaded.model, _batch(loaded)
    with dropout_forward(model):
        torch.manual_seed(3)
        rec = RecordMasks()
        grads = _param_grads(model, ids, rec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    obs = Observation(GPT2, "fedsgd", dict(zip(names, grads, strict=True)), ThreatFlags(train_mode=True), 2)
    matcher = Matcher(loaded, obs, alpha=0.01)
    x = loaded.adapter.embeddings.weight.detach()[ids].clone()
    mask = torch.ones_like(ids)
    plain = float(matcher.distance(x, ids, mask, create_graph=False))
    with dropout_forward(model):
        matcher.relax = RelaxedMasks()
        matcher.distance(x, ids, mask, create_graph=False)  # creates the sites
        with torch.no_grad():
            for theta, m in zip(matcher.relax.logits, rec.masks, strict=True):
                theta.copy_(torch.where(m > 0, 40.0, -40.0))
        exact = float(matcher.distance(x, ids, mask, create_graph=False))
    assert exact < 1e-8
    assert plain > 0.05


@pytest.mark.parametrize(
    ("model", "train_mode", "learned", "why"),
    [
        ("tiny-gpt2", True, True, None),
        ("tiny-gpt2", False, False, "dropout off"),
        ("tiny-llama", True, False, "no active dropout"),
    ],
)
def test_learn_dropout_option_is_recorded_and_declined_where_it_has_nothing_to_learn(model, train_mode, learned, why):
    ref = ModelRef(model)
    obs, secret = client_update(ref, "rotten-tomatoes", 1, 0, 4, 10, ThreatFlags(train_mode=train_mode))
    record = attack_batch("tag", obs, secret, options={"steps": 2, "learn_dropout": True})
    assert record.status == "recovered"
    assert record.options["learn_dropout"] is True
    info = record.info["dropout_masks"]
    assert info["learned"] is learned
    if learned:
        assert info["sites"] == 7 and info["rates"] == [0.1] and 0 < info["mean_mask"] < 1
    else:
        assert why in info["why"]
    loaded = load_model(ref)
    assert not loaded.model.training and loaded.model.config._attn_implementation == "sdpa"
    plain = attack_batch("tag", obs, secret, options={"steps": 2})
    assert plain.options["learn_dropout"] is False and "dropout_masks" not in plain.info


def _explicit_residual(test_inputs, z, dropped) -> float:
    """Slow reference for one support: min over c, a of ‖P(γ⊙C z − Σ_{j∈D} a_j γ⊙C e_j + c β)‖ / ‖γ⊙C z‖,
    built column by column from the definitions (numpy-free: float64 torch lstsq on the explicit matrix)."""
    basis, gamma, beta = test_inputs
    d = z.shape[0]
    proj = torch.eye(d, dtype=torch.float64) - basis @ basis.T

    def lift(v):
        return gamma * (v - v.mean())

    cols = [proj @ beta] + [proj @ lift(torch.eye(d, dtype=torch.float64)[j]) for j in dropped]
    a = torch.stack(cols, dim=1)
    target = proj @ lift(z)
    resid = target - a @ torch.linalg.lstsq(a, target[:, None]).solution[:, 0]
    return float(resid.norm() / lift(z).norm())


def test_masked_span_test_is_exact_at_a_masked_input_and_never_below_the_best_support():
    """d = 32, three layer-1 inputs LN(m ⊙ z_t / (1 − p)) with three dropped coordinates each span the
    subspace. Each member: the plain test (no atom) fails, the masked one reaches ~0 with three atoms (its
    own support); a non-member: every OMP residual is at least the best residual over all supports of that size
    (brute force), and entry 0 equals the explicit mask-free fit."""
    import itertools

    from leaklab.attacks.gradient.dropout import MaskedSpanTest

    gen = torch.Generator().manual_seed(0)
    d, p = 32, 0.1
    gamma = 1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    beta = 0.2 * torch.randn(d, generator=gen, dtype=torch.float64)
    ln = torch.nn.LayerNorm(d, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(gamma)
        ln.bias.copy_(beta)
    zs = torch.randn(3, d, generator=gen, dtype=torch.float64)
    masks = torch.ones(3, d, dtype=torch.float64)
    masks[0, [2, 9, 30]] = masks[1, [4, 7, 20]] = masks[2, [0, 11, 17]] = 0
    inputs = ln(masks * zs / (1 - p)).detach()
    basis = torch.linalg.qr(inputs.T).Q
    test = MaskedSpanTest(basis, gamma, beta)
    for z in zs:
        member = test.residuals(z, 3)
        assert member[0] > 1e-2 and member[-1] < 1e-10
    outsider = torch.randn(d, generator=gen, dtype=torch.float64)
    fits = test.residuals(outsider, 3)
    assert fits[0] == pytest.approx(_explicit_residual((basis, gamma, beta), outsider, ()), rel=1e-9)
    for k, value in enumerate(fits):
        best = min(_explicit_residual((basis, gamma, beta), outsider, s) for s in itertools.combinations(range(d), k))
        assert value >= best - 1e-12
    assert fits[-1] > 1e-3


def test_lamp_learns_the_masks_through_its_discrete_rounds():
    """LAMP with learn_dropout: continuous steps and move rounds both run with the relaxed masks (the
    optimiser is rebuilt with the mask logits after an accepted move)."""
    obs, secret = client_update(GPT2, "rotten-tomatoes", 1, 0, 4, 10, ThreatFlags(train_mode=True))
    options = {"steps": 4, "every": 2, "candidates": 2, "learn_dropout": True}
    record = attack_batch("lamp", obs, secret, options=options)
    assert record.status == "recovered" and record.info["move_rounds"] >= 1
    assert record.info["dropout_masks"]["learned"] is True
    assert record.info["dropout_masks"]["mean_mask"] != pytest.approx(0.9, abs=1e-6)  # the masks moved
