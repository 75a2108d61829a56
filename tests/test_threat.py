import dataclasses
import math

import pytest
import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.errors import LeaklabError
from leaklab.models import ModelRef, load_model
from leaklab.threat import (
    Observation,
    Secret,
    ThreatFlags,
    client_update,
    fedsgd_update,
    load_secret,
    load_update,
    require_observation,
    save_update,
)
from leaklab.threat.store import check_against_model

TEXTS = ["the cat sat on the mat", "a dog barked", "rain again today in the city"]


def _reference_next_token_grad(loaded, texts):
    """Slow reference: sum of per-token cross-entropies over all texts, divided by the total target count."""
    model = loaded.model
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([loaded.encode(t)])
        logits = model(input_ids=ids).logits[0, :-1]
        total = total + torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        count += ids.shape[1] - 1
    (total / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_fedsgd_next_token_equals_reference(name):
    ref = ModelRef(name)
    obs, secret = fedsgd_update(ref, TEXTS)
    expected = _reference_next_token_grad(load_model(ref), TEXTS)
    assert set(obs.gradients) == set(expected)
    for k, g in expected.items():
        torch.testing.assert_close(obs.gradients[k], g, rtol=1e-4, atol=1e-6)
    assert secret.texts == tuple(TEXTS) and obs.batch_size == 3


def test_fedsgd_classify_equals_reference():
    ref = ModelRef("tiny-bert", task="classify", num_labels=2)
    labels = [0, 1, 1]
    obs, _ = fedsgd_update(ref, TEXTS, labels)
    loaded = load_model(ref)
    model = loaded.model
    model.zero_grad(set_to_none=True)
    loss = sum(
        torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([loaded.encode(t)])).logits, torch.tensor([y]))
        for t, y in zip(TEXTS, labels, strict=True)
    ) / len(TEXTS)
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(obs.gradients[n], p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("name", "task"), [("tiny-llama", "next-token"), ("tiny-bert", "classify")])
def test_chunked_gradient_equals_the_whole_batch(name, task):
    """Row chunks (for memory) weighted by their loss terms give the whole batch's gradient."""
    from leaklab.threat.fedsgd import collate, gradient

    loaded = load_model(ModelRef(name, task=task, num_labels=2))
    texts = [*TEXTS, "one more line of text", "short"]
    batch = collate(loaded, [loaded.encode(t) for t in texts], [0, 1, 1, 0, 1])
    whole = gradient(loaded, batch)
    width = batch.input_ids.shape[1]
    for rows in (1, 2):
        chunked = gradient(loaded, batch, max_pass_tokens=rows * width)
        assert set(chunked) == set(whole)
        for k, g in whole.items():
            torch.testing.assert_close(chunked[k], g, rtol=1e-4, atol=1e-6)


def test_train_mode_uses_dropout_and_is_seeded():
    ref = ModelRef("tiny-bert", task="classify")
    flags = ThreatFlags(train_mode=True)
    a, _ = fedsgd_update(ref, TEXTS, [0, 1, 0], flags, seed=1)
    b, _ = fedsgd_update(ref, TEXTS, [0, 1, 0], flags, seed=1)
    c, _ = fedsgd_update(ref, TEXTS, [0, 1, 0], flags, seed=2)
    e, _ = fedsgd_update(ref, TEXTS, [0, 1, 0], ThreatFlags(), seed=1)
    k = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.gradients[k], b.gradients[k])
    assert not torch.equal(a.gradients[k], c.gradients[k]) and not torch.equal(a.gradients[k], e.gradients[k])
    assert not load_model(ref).model.training


def test_same_seed_same_batch_bit_identical(tmp_path):
    ref = ModelRef("tiny-llama")
    o1, s1 = client_update(ref, "rotten-tomatoes", 4, seed=7, min_tokens=4, max_tokens=20)
    o2, s2 = client_update(ref, "rotten-tomatoes", 4, seed=7, min_tokens=4, max_tokens=20)
    assert s1 == s2
    assert all(torch.equal(o1.gradients[k], o2.gradients[k]) for k in o1.gradients)


def test_save_load_roundtrip_has_no_secret(tmp_path):
    ref = ModelRef("tiny-gpt2")
    obs, secret = client_update(ref, "rotten-tomatoes", 2, seed=0, min_tokens=4, max_tokens=20)
    path = tmp_path / "u.safetensors"
    save_update(path, obs, secret)
    back = load_update(path)
    assert back.model == obs.model and back.flags == obs.flags and back.batch_size == 2
    assert set(back.gradients) == set(obs.gradients)
    assert all(torch.equal(back.gradients[k], obs.gradients[k]) for k in obs.gradients)
    assert back.labels is None and back.lengths is None
    field_names = {f.name for f in dataclasses.fields(Observation)}
    assert not field_names & {"texts", "token_ids"}
    assert load_secret(path) == secret


def test_update_for_another_model_names_parameter_and_shapes(tmp_path):
    obs, _ = fedsgd_update(ModelRef("tiny-gpt2"), TEXTS[:1])
    with pytest.raises(LeaklabError, match=r"is not a parameter of model 'tiny-llama'"):
        check_against_model(obs, ModelRef("tiny-llama"))
    big = dict(obs.gradients)
    big["transformer.wte.weight"] = torch.zeros(10, 128)
    bad = dataclasses.replace(obs, gradients=big)
    with pytest.raises(
        LeaklabError,
        match=r"'transformer.wte.weight' has shape \(10, 128\) but model 'tiny-gpt2' "
        r"has \(50257, 128\)",
    ):
        check_against_model(bad)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LeaklabError, match="not a safetensors update"):
        load_update(junk)
    with pytest.raises(LeaklabError, match="does not exist"):
        load_update(tmp_path / "missing.safetensors")


def test_nan_gradients_are_refused():
    obs, _ = fedsgd_update(ModelRef("tiny-gpt2"), TEXTS[:1])
    grads = dict(obs.gradients)
    g = grads["transformer.h.0.attn.c_attn.weight"].clone()
    g[0, 0] = math.nan
    grads["transformer.h.0.attn.c_attn.weight"] = g
    with pytest.raises(LeaklabError, match="NaN/inf"):
        require_observation(dataclasses.replace(obs, gradients=grads))


def test_attack_entry_point_cannot_receive_a_secret():
    obs, secret = fedsgd_update(ModelRef("tiny-gpt2"), TEXTS[:2])
    attack = make_attack("tokenset")
    with pytest.raises(TypeError, match="never a Secret"):
        run_attack(attack, secret)
    with pytest.raises(TypeError, match="Observation"):
        run_attack(attack, {"gradients": obs.gradients, "secret": secret})
    with pytest.raises(TypeError, match="holds a Secret"):
        dataclasses.replace(obs, meta={"x": secret})
    assert run_attack(attack, obs).texts


def test_flags_and_granted_metadata_must_agree():
    obs, _ = fedsgd_update(ModelRef("tiny-gpt2"), TEXTS[:1])
    with pytest.raises(LeaklabError, match="batch_size must be given"):
        dataclasses.replace(obs, batch_size=None)
    hidden, _ = fedsgd_update(ModelRef("tiny-gpt2"), TEXTS[:1], flags=ThreatFlags(batch_size_known=False))
    assert hidden.batch_size is None


def test_tokenset_leak_on_untied_embeddings():
    """Tied LM heads touch every row, so use classify (no LM head): embedding rows leak the input set."""
    ref = ModelRef("tiny-bert", task="classify")
    obs, secret = fedsgd_update(ref, TEXTS, [0, 1, 0])
    rec = run_attack(make_attack("tokenset"), obs)
    true_set = {t for ids in secret.token_ids for t in ids}
    assert set(rec.token_ids[0]) >= true_set
    assert isinstance(secret, Secret)
