"""Each threat setting's update against a slow reference computation on tiny models."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from leaklab.errors import LeaklabError
from leaklab.models import ModelRef, load_model
from leaklab.threat import ThreatFlags, fedsgd_update, load_update, save_update
from leaklab.threat.fedavg import fedavg_update
from leaklab.threat.lora import LoraSpec, lora_update
from leaklab.threat.preference import dpo_update, make_pairs, reward_ref, reward_update
from leaklab.threat.settings import THREAT_SETTINGS, make_update, resolve_setting, sample_update

TEXTS = ["the cat sat on the mat", "a dog barked", "rain again today in the city"]


def _checksum(model):
    return sum(float(p.detach().double().sum()) for p in model.parameters())


def assert_near(actual, expected, rel=1e-4):
    """‖actual − expected‖ ≤ rel·‖expected‖ (float32 sums in a different order differ by rounding)."""
    err = float((actual - expected).double().norm())
    assert err <= rel * float(expected.double().norm()) + 1e-9, f"relative error {err:.3g}"


def _next_token_loss(model, loaded, texts):
    """Reference: total target cross-entropy over unpadded texts / number of targets."""
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([loaded.encode(t)])
        logits = model(input_ids=ids).logits[0, :-1]
        total = total + F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        count += ids.shape[1] - 1
    return total / count


def test_fedavg_delta_equals_handwritten_sgd_loop():
    ref = ModelRef("tiny-gpt2")
    loaded = load_model(ref)
    before = _checksum(loaded.model)
    flags = ThreatFlags(learning_rate=0.1, local_steps=2)
    obs, secret = fedavg_update(ref, TEXTS, flags=flags, minibatch=2)
    assert _checksum(loaded.model) == before  # the memoised model is never trained
    model = copy.deepcopy(loaded.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        for chunk in (TEXTS[:2], TEXTS[2:]):
            opt.zero_grad()
            _next_token_loss(model, loaded, chunk).backward()
            opt.step()
    for (name, p0), p1 in zip(loaded.model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(obs.gradients[name], (p0 - p1).detach(), rtol=1e-4, atol=1e-6)
    assert obs.setting == "fedavg" and obs.meta["optimizer_steps"] == 4 and obs.flags.local_steps == 2
    assert secret.texts == tuple(TEXTS)


def test_fedavg_one_step_is_lr_times_fedsgd_gradient():
    ref = ModelRef("tiny-gpt2")
    delta, _ = fedavg_update(ref, TEXTS, flags=ThreatFlags(learning_rate=0.5))
    grad, _ = fedsgd_update(ref, TEXTS)
    for k, g in grad.gradients.items():
        torch.testing.assert_close(delta.gradients[k], 0.5 * g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "targets"),
    [("tiny-gpt2", ["c_attn"]), ("tiny-llama", ["q_proj", "k_proj", "v_proj"])],
)
def test_lora_shares_only_adapter_gradients_equal_to_peft_autograd(name, targets, tmp_path):
    from peft import LoraConfig, get_peft_model

    ref = ModelRef(name)
    obs, _ = lora_update(ref, TEXTS, spec=LoraSpec(r=4, alpha=8, init_seed=3))
    assert obs.gradients and all(".lora_A." in k or ".lora_B." in k for k in obs.gradients)
    assert len(obs.gradients) == 2 * 2 * len(targets)  # A and B, 2 layers
    loaded = load_model(ref)
    torch.manual_seed(3)
    peft_model = get_peft_model(
        copy.deepcopy(loaded.model),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=name == "tiny-gpt2"),
    )
    _next_token_loss(peft_model, loaded, TEXTS).backward()
    expected = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(expected) == set(obs.gradients)
    for k, g in expected.items():
        torch.testing.assert_close(obs.gradients[k], g, rtol=1e-4, atol=1e-7)
    a = next(k for k in obs.gradients if ".lora_A." in k)
    assert float(obs.gradients[a].abs().max()) == 0.0  # B = 0 at init: no signal reaches A
    save_update(tmp_path / "u.safetensors", obs)
    back = load_update(tmp_path / "u.safetensors")  # checked against the rebuilt LoRA model
    assert back.meta["lora"] == obs.meta["lora"]
    # an attacker rebuilds the same seeded A from the meta alone (fresh build, not the memoised one)
    from leaklab.threat import lora as lora_mod

    victim_a = {n: p.detach().clone() for n, p in lora_mod.lora_model(ref, back.meta["lora"]).named_parameters()}
    lora_mod._LORA.clear()
    rebuilt = dict(lora_mod.lora_model(ref, back.meta["lora"]).named_parameters())
    assert all(torch.equal(rebuilt[n], v) for n, v in victim_a.items())
    assert all(torch.equal(v, peft_model.get_parameter(n)) for n, v in victim_a.items() if ".lora_A." in n)


def _seq_logp(model, ids):
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1)
    return logp.gather(1, x[0, 1:, None]).sum()


def test_dpo_gradient_and_loss_equal_the_formula():
    ref = ModelRef("tiny-gpt2")
    loaded = load_model(ref)
    beta = 0.5
    obs, secret = dpo_update(ref, TEXTS, beta=beta, seed=4)
    ids = [loaded.encode(t) for t in TEXTS]
    pairs = make_pairs(ids, [0, 0, 0], "shuffle", 4)
    assert all(sorted(c) == sorted(r) and c != r for c, r in zip(pairs.chosen, pairs.rejected, strict=True))
    policy = copy.deepcopy(loaded.model)
    with torch.no_grad():
        ref_c = [_seq_logp(loaded.model, c) for c in pairs.chosen]
        ref_r = [_seq_logp(loaded.model, r) for r in pairs.rejected]

    def dpo_loss(model):
        terms = [
            -F.logsigmoid(beta * ((_seq_logp(model, c) - rc) - (_seq_logp(model, r) - rr)))
            for c, r, rc, rr in zip(pairs.chosen, pairs.rejected, ref_c, ref_r, strict=True)
        ]
        return sum(terms) / len(terms)

    dpo_loss(policy).backward()
    for n, p in policy.named_parameters():
        assert_near(obs.gradients[n], p.grad)
    assert secret.texts == tuple(TEXTS) and obs.batch_size == 3 and obs.meta["beta"] == beta
    # the loss value away from the reference (policy moved) against the formula
    from leaklab.threat.fedsgd import collate
    from leaklab.threat.preference import DpoObjective, sequence_log_probs

    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
        cb, rb = collate(loaded, pairs.chosen, [0] * 3), collate(loaded, pairs.rejected, [0] * 3)
        objective = DpoObjective(
            cb, rb, sequence_log_probs(loaded.model, cb), sequence_log_probs(loaded.model, rb), beta
        )
        torch.testing.assert_close(objective.mean_loss(policy), dpo_loss(policy), rtol=1e-4, atol=1e-6)


def test_reward_model_gradient_equals_bradley_terry_formula():
    ref = ModelRef("tiny-llama")
    obs, _ = reward_update(ref, TEXTS, seed=1)
    assert obs.model == reward_ref(ref) and obs.model.num_labels == 1
    loaded = load_model(obs.model)
    pairs = make_pairs([loaded.encode(t) for t in TEXTS], [0] * 3, "shuffle", 1)
    model = copy.deepcopy(loaded.model)

    def r(ids):
        return model(input_ids=torch.tensor([ids])).logits[0, 0]

    loss = sum(-F.logsigmoid(r(c) - r(x)) for c, x in zip(pairs.chosen, pairs.rejected, strict=True)) / 3
    loss.backward()
    for n, p in model.named_parameters():
        assert_near(obs.gradients[n], p.grad)


def test_label_pairing_prefers_the_higher_label():
    pairs = make_pairs([[1, 2], [3, 4], [5, 6], [7, 8]], [0, 1, 1, 0], "label", 0)
    assert pairs.chosen == [[3, 4], [5, 6]] and pairs.rejected == [[1, 2], [7, 8]]
    with pytest.raises(LeaklabError, match="even number"):
        make_pairs([[1, 2]] * 3, [0] * 3, "label", 0)


def test_secagg_is_the_mean_of_individual_updates():
    ref = ModelRef("tiny-gpt2")
    obs, secret = sample_update("secagg", ref, "rotten-tomatoes", 2, 5, 4, 16, clients=3, reduce="mean")
    assert len(secret) == 6 and len(set(secret.texts)) == 6
    assert obs.flags.num_clients == 3 and obs.batch_size == 6
    parts = [fedsgd_update(ref, list(secret.texts[2 * c : 2 * c + 2]), seed=5 + c)[0] for c in range(3)]
    for k, g in obs.gradients.items():
        torch.testing.assert_close(g, sum(p.gradients[k] for p in parts) / 3, rtol=1e-5, atol=1e-7)


def test_dropout_flag_reaches_multi_step_settings():
    ref = ModelRef("tiny-gpt2")  # GPT-2 dropout 0.1
    on = ThreatFlags(train_mode=True, learning_rate=0.1)
    a, _ = make_update("fedavg", ref, TEXTS, flags=on, seed=1)
    b, _ = make_update("fedavg", ref, TEXTS, flags=on, seed=1)
    c, _ = make_update("fedavg", ref, TEXTS, flags=on, seed=2)
    off, _ = make_update("fedavg", ref, TEXTS, flags=ThreatFlags(learning_rate=0.1), seed=1)
    k = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a.gradients[k], b.gradients[k])
    assert not torch.equal(a.gradients[k], c.gradients[k]) and not torch.equal(a.gradients[k], off.gradients[k])
    assert not load_model(ref).model.training


def test_bad_setting_options_are_refused():
    ref = ModelRef("tiny-gpt2")
    with pytest.raises(LeaklabError, match=r"no option.*valid: minibatch"):
        make_update("fedavg", ref, TEXTS, bogus=1)
    with pytest.raises(LeaklabError, match="belong to fedavg"):
        make_update("fedsgd", ref, TEXTS, flags=ThreatFlags(learning_rate=0.1))
    with pytest.raises(LeaklabError, match="unknown threat setting 'fedprox'; valid: dpo, fedavg"):
        make_update("fedprox", ref, TEXTS)
    with pytest.raises(LeaklabError, match="cannot be split evenly"):
        make_update("secagg", ref, TEXTS, clients=2)
    with pytest.raises(LeaklabError, match="learning_rate must be > 0"):
        ThreatFlags(learning_rate=0.0)


@pytest.mark.parametrize("name", THREAT_SETTINGS.names())
def test_every_setting_refuses_an_unknown_option_with_one_line_of_its_keys(name):
    keys = THREAT_SETTINGS.get(name).config.keys()  # secagg's default inner setting, fedsgd, has none
    with pytest.raises(LeaklabError) as exc:
        resolve_setting(name, {"bogus": "1"})
    where = "threat setting 'secagg' (inner fedsgd)" if name == "secagg" else f"threat setting '{name}'"
    assert str(exc.value) == f"{where} has no option 'bogus'; valid: {', '.join(keys) or 'none'}"


def test_setting_options_are_typed_checked_and_listed():
    from typer.testing import CliRunner

    from leaklab.cli.gradient import app
    from leaklab.threat.lora import TARGETS
    from leaklab.threat.observation import SETTINGS
    from leaklab.threat.preference import PAIRINGS
    from leaklab.threat.secagg import REDUCTIONS

    assert SETTINGS == ("dpo", "fedavg", "fedsgd", "lora", "reward", "secagg") == tuple(THREAT_SETTINGS.names())
    s = resolve_setting("secagg", ["clients=4", "inner=lora", "r=2", "targets=q"])
    assert s.options.clients == 4 and s.client.options.r == 2 and s.texts_per_batch(3) == 12
    assert resolve_setting("dpo", {"pairing": "label"}).texts_per_batch(3) == 6
    assert s.to_dict() == {
        **resolve_setting("lora", {"r": 2, "targets": "q"}).to_dict(),
        "clients": 4,
        "inner": "lora",
        "reduce": "mean",
    }
    with pytest.raises(LeaklabError, match="threat setting 'lora' option 'r': expected an integer, got 'two'"):
        resolve_setting("lora", ["r=two"])
    with pytest.raises(LeaklabError, match="setting option 'lora' is not of the form key=value"):
        resolve_setting("secagg", ["lora"])
    with pytest.raises(LeaklabError, match="unknown inner setting 'secagg'; valid: dpo, fedavg, fedsgd, lora, reward"):
        resolve_setting("secagg", {"inner": "secagg"})
    with pytest.raises(
        LeaklabError,
        match=r"threat setting 'secagg' \(inner lora\) has no option 'beta'; valid: clients, inner, reduce, minibatch",
    ):
        resolve_setting("secagg", {"inner": "lora", "beta": 1})
    with pytest.raises(LeaklabError, match="threat setting 'fedsgd' is already registered"):
        THREAT_SETTINGS.register("fedsgd", make_update)
    choices = {
        o["name"]: o["type"] for n in ("lora", "dpo", "secagg") for o in THREAT_SETTINGS.get(n).config.describe()
    }
    assert choices["targets"].split("|") == list(TARGETS) and choices["pairing"].split("|") == list(PAIRINGS)
    assert choices["reduce"].split("|") == list(REDUCTIONS)

    runner = CliRunner()
    res = runner.invoke(app, ["settings", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: {o["name"]: o["default"] for o in r["options"]} for r in json.loads(res.stdout)}
    assert sorted(rows) == THREAT_SETTINGS.names() and rows["fedsgd"] == {}
    assert rows["lora"] == {"minibatch": None, "r": 8, "alpha": 16, "targets": "attention", "lora_seed": 0}
    assert rows["secagg"] == {"clients": 2, "inner": "fedsgd", "reduce": "mean"}
    res = runner.invoke(app, ["update-setting", "--setting", "lora", "--setting-option", "rank=4"])
    assert isinstance(res.exception, LeaklabError)
    assert (
        str(res.exception)
        == "threat setting 'lora' has no option 'rank'; valid: minibatch, r, alpha, targets, lora_seed"
    )


def test_the_setting_registry_imports_without_the_model_code():
    code = "import sys, leaklab.threat.settings as s; s.THREAT_SETTINGS.names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
