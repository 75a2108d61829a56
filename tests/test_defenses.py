"""Each defense against its formula; Opacus's accountant; DP-SGD per-sample clipping; refusals."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from leaklab.defenses import DEFENSES, apply_defenses, defended_update, make_defense, parse_defense
from leaklab.defenses.dpsgd import noise_for_epsilon, rdp_epsilon
from leaklab.defenses.update import embedding_params
from leaklab.defenses.utility import HorizonOptions
from leaklab.errors import LeaklabError
from leaklab.models import ModelRef, load_model
from leaklab.threat import ThreatFlags, fedsgd_update, load_update, save_update
from leaklab.threat.observation import Observation, grad_norm
from leaklab.threat.settings import make_update

TEXTS = ["the cat sat on the mat", "a dog barked", "rain again today in the city"]
GPT2 = ModelRef("tiny-gpt2")


@pytest.fixture(scope="module")
def obs():
    return fedsgd_update(GPT2, TEXTS)[0]


def _flat(o):
    return torch.cat([g.reshape(-1) for g in o.gradients.values()])


def test_clip_scales_to_the_bound_and_keeps_small_updates(obs):
    norm = grad_norm(obs.gradients)
    clipped = make_defense("clip", max_norm=norm / 4).apply(obs)
    assert math.isclose(grad_norm(clipped.gradients), norm / 4, rel_tol=1e-5)
    torch.testing.assert_close(_flat(clipped), _flat(obs) / 4)
    same = make_defense("clip", max_norm=norm * 2).apply(obs)
    assert torch.equal(_flat(same), _flat(obs))
    assert clipped.defenses == [{"name": "clip", "side": "server", "params": {"max_norm": norm / 4}}]


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    fraction=st.floats(0.01, 1.0),
    max_norm=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_topk_and_clip_match_brute_force_on_random_updates(shapes, fraction, max_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = {f"t{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    o = Observation(model=GPT2, setting="fedsgd", gradients=grads, batch_size=1)
    flat = _flat(o)
    top = _flat(make_defense("topk", fraction=fraction).apply(o))
    k = math.ceil(fraction * flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))
    assert int((top != 0).sum()) == k and set(torch.nonzero(top).flatten().tolist()) == set(order[:k])
    clipped = _flat(make_defense("clip", max_norm=max_norm).apply(o))
    norm = float(flat.norm())
    torch.testing.assert_close(clipped, flat * min(1.0, max_norm / norm))


def test_gaussian_noise_has_the_given_std_and_is_seeded(obs):
    noisy = make_defense("gaussian", sigma=0.3).apply(obs, seed=1)
    noise = (_flat(noisy) - _flat(obs)).double()
    assert noise.numel() > 10**6
    assert abs(float(noise.std()) - 0.3) < 0.003 and abs(float(noise.mean())) < 0.003
    again = make_defense("gaussian", sigma=0.3).apply(obs, seed=1)
    other = make_defense("gaussian", sigma=0.3).apply(obs, seed=2)
    assert torch.equal(_flat(again), _flat(noisy)) and not torch.equal(_flat(other), _flat(noisy))


def test_gaussian_calibrated_from_epsilon_uses_the_clip_bound(obs):
    out = apply_defenses(obs, [make_defense("clip", max_norm=2.0), make_defense("gaussian", epsilon=0.5, delta=1e-5)])
    expected = 2.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    rec = out.defenses[-1]
    assert math.isclose(rec["std"], expected) and rec["sensitivity"] == 2.0
    with pytest.raises(LeaklabError, match="needs an L2 sensitivity: clip the update first"):
        make_defense("gaussian", epsilon=1.0).apply(obs)


def test_laplace_noise_matches_its_distribution(obs):
    noisy = make_defense("laplace", scale=0.2).apply(obs, seed=3)
    noise = (_flat(noisy) - _flat(obs)).double()
    assert abs(float(noise.abs().mean()) - 0.2) < 0.002  # E|Lap(0,b)| = b
    assert abs(float(noise.var()) - 2 * 0.2**2) < 0.002  # Var = 2b²
    out = apply_defenses(obs, [make_defense("clip", max_norm=1.0), make_defense("laplace", epsilon=4.0)])
    d = _flat(obs).numel()
    assert math.isclose(out.defenses[-1]["scale"], math.sqrt(d) / 4.0)


@pytest.mark.parametrize("fraction", [0.001, 0.05])
def test_topk_keeps_exactly_the_k_largest(obs, fraction):
    out = make_defense("topk", fraction=fraction).apply(obs)
    before, after = _flat(obs), _flat(out)
    k = math.ceil(fraction * before.numel())
    kept = after != 0
    assert int(kept.sum()) == k == out.defenses[0]["kept"]
    assert torch.equal(after[kept], before[kept])
    assert float(before.abs()[kept].min()) >= float(before.abs()[~kept].max())


def test_frozen_embeddings_absent_post_hoc_and_client_side(obs):
    emb = set(embedding_params(load_model(GPT2).model))
    assert emb == {"transformer.wte.weight", "transformer.wpe.weight"}
    dropped = make_defense("frozen-embeddings").apply(obs)
    assert not emb & set(dropped.gradients) and set(dropped.gradients) == set(obs.gradients) - emb
    flags = ThreatFlags(learning_rate=0.1, local_steps=2)
    client, _ = make_update("fedavg", GPT2, TEXTS, flags=flags, hooks=[make_defense("frozen-embeddings")])
    assert not emb & set(client.gradients) and client.defenses[0]["name"] == "frozen-embeddings"
    plain, _ = make_update("fedavg", GPT2, TEXTS, flags=flags)
    k = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(client.gradients[k], plain.gradients[k])  # trained on a different trajectory
    with pytest.raises(LeaklabError, match="multi-step update must act during training"):
        make_defense("frozen-embeddings").apply(plain)


def test_accountant_epsilon_equals_opacus_rdp_directly():
    from opacus.accountants import RDPAccountant

    for sigma, q, steps, delta in [(1.0, 1.0, 1, 1e-5), (0.8, 0.01, 500, 1e-6), (2.0, 0.25, 12, 1e-5)]:
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert math.isclose(rdp_epsilon(sigma, q, steps, delta), acc.get_epsilon(delta), rel_tol=1e-9)
    assert rdp_epsilon(0.0, 1.0, 1, 1e-5) is None  # no noise: no finite guarantee (JSON-safe)
    sigma = noise_for_epsilon(8.0, 1e-5, 1.0, 1)
    assert 7.9 <= rdp_epsilon(sigma, 1.0, 1, 1e-5) <= 8.0


def _per_sample_grads(model, loaded, texts):
    out = []
    for t in texts:
        model.zero_grad()
        ids = torch.tensor([loaded.encode(t)])
        F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return out


def _clipped_mean(per_sample, clip):
    out = {}
    for g in per_sample:
        scale = min(1.0, clip / (grad_norm(g) + 1e-6))
        for n, v in g.items():
            out[n] = out.get(n, 0) + scale * v / len(per_sample)
    return out


@pytest.mark.parametrize(
    ("name", "mode"), [("tiny-gpt2", "hooks"), ("tiny-llama", "hooks"), ("tiny-llama", "functorch")]
)
def test_dpsgd_without_noise_is_the_mean_of_clipped_per_sample_gradients(name, mode):
    ref = ModelRef(name)
    loaded = load_model(ref)
    per_sample = _per_sample_grads(copy.deepcopy(loaded.model), loaded, TEXTS)
    clip = 0.5 * min(grad_norm(g) for g in per_sample)  # every sample is clipped
    dp = make_defense("dpsgd", clip=clip, noise_multiplier=0.0, mode=mode)
    obs, _ = make_update("fedsgd", ref, TEXTS, hooks=[dp])
    expected = _clipped_mean(per_sample, clip)
    for n, g in expected.items():
        err = float((obs.gradients[n] - g).norm())
        assert err <= 1e-4 * float(g.norm()) + 1e-8, n
    one, _ = make_update("fedsgd", ref, TEXTS[:1], hooks=[dp])
    assert grad_norm(one.gradients) <= clip * (1 + 1e-5)  # a single clipped per-sample gradient


def test_dpsgd_on_dpo_clips_per_pair():
    from leaklab.threat.preference import make_pairs

    loaded = load_model(GPT2)
    beta = 1.0
    pairs = make_pairs([loaded.encode(t) for t in TEXTS], [0] * 3, "shuffle", 0)
    model = copy.deepcopy(loaded.model)
    per_pair = []
    for c, r in zip(pairs.chosen, pairs.rejected, strict=True):
        model.zero_grad()
        lp = [
            torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, :-1], -1)
            .gather(1, torch.tensor(s)[1:, None])
            .sum()
            for s in (c, r)
        ]
        (-F.logsigmoid(beta * (lp[0] - lp[0].detach() - lp[1] + lp[1].detach()))).backward()
        per_pair.append({n: p.grad.clone() for n, p in model.named_parameters()})
    clip = 0.5 * min(grad_norm(g) for g in per_pair)
    obs, _ = make_update("dpo", GPT2, TEXTS, beta=beta, hooks=[make_defense("dpsgd", clip=clip, noise_multiplier=0.0)])
    for n, g in _clipped_mean(per_pair, clip).items():
        assert float((obs.gradients[n] - g).norm()) <= 1e-4 * float(g.norm()) + 1e-8, n


def test_dpsgd_noise_and_record(tmp_path):
    obs, _ = defended_update(
        "fedsgd", GPT2, "rotten-tomatoes", 2, 0, [parse_defense("dpsgd", ["clip=1", "epsilon=8"])], 4, 16
    )
    rec = obs.defenses[0]
    assert rec["name"] == "dpsgd" and rec["accounted_steps"] == 1
    assert 7.9 <= rec["epsilon"] <= 8.0 and rec["epsilon"] == rdp_epsilon(rec["noise_multiplier"], 1.0, 1, 1e-5)
    # noise std σ·C/B per coordinate dominates the clipped signal (norm ≤ C)
    noise_std = float(_flat(obs).std())
    assert abs(noise_std - rec["noise_multiplier"] * 1.0 / 2) < 0.01
    save_update(tmp_path / "u.safetensors", obs)
    assert load_update(tmp_path / "u.safetensors").defenses == obs.defenses
    flags = ThreatFlags(learning_rate=0.1, local_steps=2)
    dp = make_defense("dpsgd", noise_multiplier=1.0)
    avg, _ = defended_update("fedavg", GPT2, "rotten-tomatoes", 2, 0, [dp], 4, 16, flags, minibatch=1)
    assert avg.defenses[0]["accounted_steps"] == 4
    assert avg.defenses[0]["epsilon"] == rdp_epsilon(1.0, 1.0, 4, 1e-5)


def test_inapplicable_defenses_are_refused(obs):
    with pytest.raises(LeaklabError, match="dpsgd does not apply to an update already computed"):
        make_defense("dpsgd", noise_multiplier=1.0).apply(obs)
    with pytest.raises(LeaklabError, match="aggregate changes the protocol"):
        make_defense("aggregate", clients=4).apply(obs)
    with pytest.raises(LeaklabError, match="already secagg"):
        defended_update("secagg", GPT2, "rotten-tomatoes", 1, 0, [make_defense("aggregate")], clients=2)
    with pytest.raises(LeaklabError, match="no embedding table is trained"):
        make_update("lora", GPT2, TEXTS, hooks=[make_defense("frozen-embeddings")], r=2)
    empty = make_defense("frozen-embeddings").apply(obs)
    empty = empty.__class__(**{**empty.__dict__, "gradients": {}})
    with pytest.raises(LeaklabError, match="topk' does not apply: the update shares no tensor"):
        make_defense("topk", fraction=0.1).apply(empty)
    with pytest.raises(LeaklabError, match="given twice"):
        defended_update("fedsgd", GPT2, "rotten-tomatoes", 1, 0, [make_defense("dpsgd", noise_multiplier=1)] * 2)


def test_registry_lists_valid_names_and_parameters():
    with pytest.raises(LeaklabError, match="unknown defense 'dp'; valid: aggregate, clip, dpsgd"):
        make_defense("dp")
    with pytest.raises(LeaklabError, match="defense 'dpsgd' has no option 'sigma'; valid: clip, noise_multiplier"):
        parse_defense("dpsgd", ["sigma=1"])
    with pytest.raises(LeaklabError, match="exactly one of noise_multiplier or epsilon"):
        parse_defense("dpsgd", ["clip=1"])
    with pytest.raises(LeaklabError, match="not of the form key=value"):
        parse_defense("clip", ["3"])
    with pytest.raises(LeaklabError, match="fraction must be in"):
        parse_defense("topk", ["fraction=2"])
    assert parse_defense("topk", ["fraction=0.5"]).fraction == 0.5
    assert parse_defense("topk:fraction=0.5").fraction == 0.5
    with pytest.raises(LeaklabError, match="defense 'clip' option 'max_norm': expected a number, got 'abc'"):
        parse_defense("clip:max_norm=abc")
    with pytest.raises(LeaklabError, match="'max_norm' is given twice"):
        parse_defense("clip:max_norm=1", ["max_norm=2"])
    with pytest.raises(LeaklabError, match="defense 'dpsgd' option 'mode': 'x' is not one of hooks, functorch"):
        make_defense("dpsgd", noise_multiplier=1, mode="x")


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_refuses_an_unknown_option_with_one_line_of_its_keys(name):
    keys = DEFENSES.get(name).config.keys()
    with pytest.raises(LeaklabError) as exc:
        make_defense(name, bogus="1")
    assert str(exc.value) == f"defense '{name}' has no option 'bogus'; valid: {', '.join(keys) or 'none'}"


def test_defense_registry_refuses_duplicates_and_lists_options():
    from typer.testing import CliRunner

    from leaklab.cli.gradient import app
    from leaklab.defenses import register_defense
    from leaklab.defenses.update import Clip

    with pytest.raises(LeaklabError, match="defense 'clip' is already registered"):
        register_defense(Clip)
    res = CliRunner().invoke(app, ["defenses", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert sorted(rows) == DEFENSES.names()
    assert {r["name"]: r["side"] for r in rows.values()} == {n: DEFENSES.get(n).impl.side for n in rows}
    opts = {o["name"]: o for o in rows["dpsgd"]["options"]}
    assert opts["clip"] == {"name": "clip", "type": "float", "default": 1.0, "help": "per-sample L2 bound C (> 0)"}
    assert opts["mode"]["default"] == "hooks" and opts["mode"]["type"] == "hooks|functorch"
    assert rows["frozen-embeddings"]["options"] == [] and rows["clip"]["help"].startswith("u ← u · min(1, C")


def test_utility_applies_the_update_and_scores_public_texts():
    from leaklab.corpora import split_of
    from leaklab.defenses.utility import utility, validation_texts
    from leaklab.threat.fedavg import fedavg_update
    from leaklab.threat.fedsgd import collate
    from leaklab.threat.local import TextObjective

    upd, _ = fedavg_update(GPT2, TEXTS, flags=ThreatFlags(learning_rate=0.5))
    texts, _ = validation_texts(upd, "rotten-tomatoes", 8, 0, 2, 24)
    assert all(split_of(t) == "public" for t in texts)
    loaded = load_model(GPT2)
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.sub_(upd.gradients[n])
        batch = collate(loaded, [loaded.encode(t) for t in texts], [0] * len(texts))
        expected = float(TextObjective(batch, "next-token").mean_loss(model))
        before = float(TextObjective(batch, "next-token").mean_loss(loaded.model))
    u = utility(upd, "rotten-tomatoes", 8, 0, 2, 24)
    assert math.isclose(u["loss"], expected, rel_tol=1e-5) and math.isclose(u["loss_before"], before, rel_tol=1e-5)
    assert u["loss"] < u["loss_before"] and u["applied"] == "theta - delta"


def _reference_horizon(ref: ModelRef, steps: int, lr: float, texts: list[str]) -> float:
    """Slow obvious reference: a private copy of the model, plain autograd on each seed's batch, θ ← θ − lr·g."""
    from leaklab.threat.fedsgd import collate, private_sample
    from leaklab.threat.local import TextObjective

    loaded = load_model(ref)
    model = copy.deepcopy(loaded.model)
    for step in range(steps):
        sample = private_sample(ref, "rotten-tomatoes", 2, step, 4, 16)
        batch = collate(loaded, [loaded.encode(t) for t in sample.texts], [0] * 2)
        model.zero_grad()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
    with torch.no_grad():
        batch = collate(loaded, [loaded.encode(t) for t in texts], [0] * len(texts))
        return float(TextObjective(batch, "next-token").mean_loss(model))


def test_horizon_utility_matches_a_manual_training_loop_and_restores_the_model():
    """20-step horizon machinery on tiny-llama: 3 undefended rounds equal a hand-written SGD loop on a model copy
    (same batches), the shared model is unchanged afterwards, a defense changes the result, 0 rounds = before."""
    from leaklab.defenses.utility import horizon_utility, validation_texts

    ref = ModelRef("tiny-llama")
    loaded = load_model(ref)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    opts = HorizonOptions(steps=3, server_lr=0.5, texts=6)
    plain = horizon_utility("fedsgd", ref, "rotten-tomatoes", 2, 0, (), opts, 4, 16)
    obs, _ = fedsgd_update(ref, ["a b"])
    texts, _ = validation_texts(obs, "rotten-tomatoes", 6, 0, 2, 16)
    assert math.isclose(plain["loss"], _reference_horizon(ref, 3, 0.5, texts), rel_tol=1e-4)
    assert plain["loss"] < plain["loss_before"] and plain["batch_seeds"] == [0, 1, 2]
    assert all(torch.equal(p, start[n]) for n, p in loaded.model.named_parameters())
    noisy = horizon_utility("fedsgd", ref, "rotten-tomatoes", 2, 0, [make_defense("gaussian", sigma=1.0)], opts, 4, 16)
    assert noisy["loss"] > plain["loss"] + 0.1 and noisy["loss_before"] == plain["loss_before"]
    none = horizon_utility("fedsgd", ref, "rotten-tomatoes", 2, 0, (), HorizonOptions(steps=0, texts=6), 4, 16)
    assert none["loss"] == none["loss_before"] == plain["loss_before"]
    assert HorizonOptions().steps == 20
    with pytest.raises(LeaklabError, match="fedsgd or fedavg, not 'lora'"):
        horizon_utility("lora", ref, "rotten-tomatoes", 2, 0, (), opts)


def test_sweep_writes_table_json_plot_with_epsilon(tmp_path):
    import json

    from leaklab.sweep import sweep

    horizon = HorizonOptions(steps=2, texts=4)
    result = sweep(
        "dpsgd", [0.5], "tokenset", "tiny-gpt2", "rotten-tomatoes", 2, 1, 0, tmp_path, max_tokens=16, horizon=horizon
    )
    rows = result["rows"]
    assert all(r["horizon"]["steps"] == 2 and r["horizon"]["loss"] > 0 for r in rows)
    assert rows[0]["horizon"]["loss_before"] == rows[1]["horizon"]["loss_before"]  # same start, same batches
    assert "| loss after N |" in (tmp_path / "sweep.md").read_text()
    assert [r["value"] for r in rows] == ["none", 0.5] and rows[0]["epsilon"] is None
    assert rows[1]["epsilon"] == rdp_epsilon(0.5, 1.0, 1, 1e-5)
    assert all(r["metric"] == "bag_f1" and 0 < r["leak"] <= 1 and r["rouge1"] is None for r in rows)
    assert all(r["utility_loss"] > 0 for r in rows)
    assert json.loads((tmp_path / "sweep.json").read_text())["config"]["defense"] == "dpsgd"
    assert "| noise_multiplier | ε |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(LeaklabError, match="unknown defense 'dps'"):
        sweep("dps", [1], "tokenset", "tiny-gpt2", "rotten-tomatoes", 2, 1, 0, tmp_path)


def test_cli_update_setting_then_apply_defense(tmp_path):
    from typer.testing import CliRunner

    from leaklab.cli.gradient import app

    runner = CliRunner()
    path = tmp_path / "u.safetensors"
    res = runner.invoke(
        app,
        [
            "update-setting",
            "--setting",
            "fedavg",
            "--lr",
            "0.1",
            "--model",
            "tiny-gpt2",
            "--batch-size",
            "2",
            "--max-tokens",
            "16",
            "--defense",
            "frozen-embeddings",
            "--out",
            str(path),
        ],
    )
    assert res.exit_code == 0, res.output
    obs = load_update(path)
    assert obs.setting == "fedavg" and "transformer.wte.weight" not in obs.gradients
    res = runner.invoke(app, ["apply-defense", str(path), "--defense", "dpsgd:noise_multiplier=1"])
    assert isinstance(res.exception, LeaklabError) and "does not apply to an update already computed" in str(
        res.exception
    )
    out = tmp_path / "d.safetensors"
    res = runner.invoke(app, ["apply-defense", str(path), "--defense", "clip:max_norm=0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert math.isclose(grad_norm(load_update(out).gradients), 0.5, rel_tol=1e-5)
    res = runner.invoke(
        app,
        [
            "apply-defense",
            str(path),
            "--defense",
            "clip",
            "--defense",
            "topk",
            "--defense-param",
            "fraction=0.1",
        ],
    )
    assert isinstance(res.exception, LeaklabError) and "exactly one --defense" in str(res.exception)


@pytest.mark.real
def test_dpsgd_on_lora_adapters_of_smollm2():
    """Opacus on the packaged Llama (RMSNorm, RoPE, GQA): per-sample clipping of LoRA adapter gradients."""
    from leaklab.threat.lora import LoraSpec, lora_model

    ref = ModelRef("smollm2-135m")
    loaded = load_model(ref)
    spec = LoraSpec(r=2, targets="q")
    adapted = copy.deepcopy(lora_model(ref, spec.meta(loaded)))
    per_sample = []
    for t in TEXTS[:2]:
        adapted.zero_grad()
        ids = torch.tensor([loaded.encode(t)])
        F.cross_entropy(adapted(input_ids=ids).logits[0, :-1], ids[0, 1:]).backward()
        per_sample.append({n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad})
    clip = 0.5 * min(grad_norm(g) for g in per_sample)
    dp = make_defense("dpsgd", clip=clip, noise_multiplier=0.0)
    obs, _ = make_update("lora", ref, TEXTS[:2], hooks=[dp], r=2, targets="q")
    assert len(obs.gradients) == 2 * 30  # A and B of q_proj in 30 layers
    for n, g in _clipped_mean(per_sample, clip).items():
        assert float((obs.gradients[n] - g).norm()) <= 1e-3 * float(g.norm()) + 1e-9, n


def test_interrupted_sweep_keeps_the_points_it_finished(tmp_path, monkeypatch):
    import json

    import leaklab.sweep as sweep_mod

    real, calls = sweep_mod.attack_batch, []

    def flaky(atk, obs, secret, **kw):
        calls.append(1)
        if len(calls) > 1:  # the second point (after the undefended baseline) is interrupted
            raise KeyboardInterrupt
        return real(atk, obs, secret, **kw)

    monkeypatch.setattr(sweep_mod, "attack_batch", flaky)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.sweep(
            "clip",
            [1.0],
            "tokenset",
            "tiny-gpt2",
            "rotten-tomatoes",
            2,
            1,
            0,
            out,
            max_tokens=16,
            horizon=HorizonOptions(steps=0),
        )
    assert not out.exists()  # an interrupted sweep does not read as a finished one
    kept = tmp_path / "sweep.incomplete"
    rows = json.loads((kept / "sweep.json").read_text())["rows"]
    assert [r["value"] for r in rows] == ["none"]
    assert "| none |" in (kept / "sweep.md").read_text()
    assert json.loads((kept / "status.json").read_text())["status"] == "incomplete"


def test_cli_sweep_utility_steps_option_reaches_the_horizon(tmp_path):
    """``leaklab gradient sweep --utility-steps 2``: the config records 2 rounds and every point has its loss."""
    from typer.testing import CliRunner

    from leaklab.cli.gradient import app

    out = tmp_path / "s"
    args = ["sweep", "--defense", "clip", "--values", "1", "--attack", "tokenset", "--model", "tiny-gpt2"]
    res = CliRunner().invoke(
        app,
        [*args, "--batch-size", "2", "--batches", "1", "--max-tokens", "16", "--utility-steps", "2", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["config"]["horizon"]["steps"] == 2
    assert all(r["horizon"]["steps"] == 2 and r["horizon"]["loss"] > 0 for r in saved["rows"])
