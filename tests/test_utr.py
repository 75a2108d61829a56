"""UTR-style sentence decoding in LoRA adapter space (leaklab.attacks.gradient.utr) on tiny-llama."""

from __future__ import annotations

from dataclasses import replace

import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.utr import (
    GRANTED_TOKEN_SET,
    LORA_B,
    Residual,
    adapter_modules,
    observed_vector,
    prefix_adapter_gradients,
)
from leaklab.metrics import score_batch
from leaklab.models.registry import ModelRef
from leaklab.threat.lora import lora_model
from leaklab.threat.observation import ThreatFlags
from leaklab.threat.settings import sample_update


def _update(b: int, setting: str = "lora", **opts):
    return sample_update(setting, ModelRef("tiny-llama"), "rotten-tomatoes", b, 0, 4, 10, ThreatFlags(), **opts)


def _names(obs) -> list[str]:
    return [n for n in obs.gradients if n.endswith(f"{LORA_B}.weight")]


def _autograd(model, names: list[str], ids: list[int], first_target: int = 1) -> torch.Tensor:
    """Slow reference: autograd of one text's summed next-token loss over targets from ``first_target`` on, with
    respect to the lora_B weights themselves."""
    params = dict(model.named_parameters())
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :first_target] = -100
    logits = model(input_ids=x).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.cat([g.flatten() for g in grads]).double()


def test_prefix_adapter_gradients_match_autograd_and_are_additive_parts_of_the_update():
    obs, sec = _update(2, r=8)
    model = lora_model(obs.model, obs.meta["lora"])
    names = _names(obs)
    mods = adapter_modules(model, names)
    texts = [list(t) for t in sec.token_ids]
    cut = texts[0][:3]
    rows = [texts[0], cut, texts[1]]
    with torch.enable_grad():
        fast = prefix_adapter_gradients(model, mods, rows)  # rows of different lengths, padded and masked
        slow = torch.stack([_autograd(model, names, r) for r in rows])
        later = _autograd(model, names, texts[0], first_target=3)  # text 0's loss terms after the prefix
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-6 * float(slow.abs().max()))
    # the prefix's gradient is an exact additive part of its text's gradient
    assert torch.allclose(fast[1] + later, fast[0], rtol=1e-4, atol=1e-6 * float(slow.abs().max()))
    # and the texts' gradients sum to the update (the mean loss over all targets: 1/N)
    y = observed_vector(obs, names)
    n_targets = sum(len(t) - 1 for t in texts)
    assert float(((fast[0] + fast[2]) / n_targets - y).norm() / y.norm()) < 1e-4
    # the true texts explain the update exactly; one token changed does not
    wrong = [*texts[0][:2], (texts[0][2] + 1) % 1000, *texts[0][3:]]
    with torch.enable_grad():
        g_wrong = prefix_adapter_gradients(model, mods, [wrong])[0]
    fit = Residual(y, [fast[2]])
    assert float(fit(fast[:1])[0]) < 1e-4 < 0.01 < float(fit(g_wrong[None])[0])


def test_utr_reads_a_saturated_lora_r8_update_with_the_granted_token_set_and_records_it():
    obs, sec = _update(1, r=8)
    somp = run_attack(make_attack("somp"), obs)
    assert somp.status == "no_signal"  # the span view is saturated at r = 8
    granted = replace(obs, meta={**obs.meta, GRANTED_TOKEN_SET: sorted({x for t in sec.token_ids for x in t})})
    rec = run_attack(make_attack("utr", {"grant_token_set": True, "passes": 0, "beam": 8, "patience": 3}), granted)
    assert rec.ok, rec.reason
    assert rec.info["grants"]["token_set"] is True
    scored = score_batch(rec.texts, list(sec.texts), rec.token_ids, [list(t) for t in sec.token_ids])
    assert rec.token_ids == [list(sec.token_ids[0])], (rec.token_ids, sec.token_ids)
    assert scored.aggregate()["rouge1"] == 1.0


def test_utr_refuses_what_it_cannot_read():
    obs, _ = _update(1, "fedsgd")  # no adapter gradients
    rec = run_attack(make_attack("utr"), obs)
    assert rec.status == "could_not_run" and "does not support the 'fedsgd' setting" in rec.reason
    lora, _ = _update(1, r=8)
    rec = run_attack(make_attack("utr", {"grant_token_set": True}), lora)
    assert rec.status == "could_not_run" and "grants no token set" in rec.reason


def test_matched_filter_is_the_logit_change_along_the_residual():
    """The filter's finite difference against autograd: −∂z_c/∂B·v for a few tokens c."""
    from leaklab.attacks.gradient.utr import Decoder, UtrOptions
    from leaklab.models.registry import load_model

    obs, sec = _update(1, r=8)
    model = lora_model(obs.model, obs.meta["lora"])
    names = _names(obs)
    y = observed_vector(obs, names)
    sizes = {n: obs.gradients[n].numel() for n in names}
    dec = Decoder(model, load_model(obs.model).tokenizer, y, sizes, UtrOptions(filter_width=5), None)
    fit = Residual(dec.y, [])
    prefix = list(sec.token_ids[0][:4])
    top = dec.filtered(prefix, fit)
    v = (dec.w * fit.y).float()
    params = dict(model.named_parameters())
    with torch.enable_grad():
        z = model(input_ids=torch.tensor([prefix])).logits[0, -1]
        scores = []
        for c in range(z.shape[0]) if z.shape[0] <= 64 else [*top, 0, 1, 2]:
            g = torch.autograd.grad(z[c], [params[n] for n in names], retain_graph=True)
            scores.append(-float(torch.cat([x.flatten() for x in g]) @ v))
    assert all(not p.any() for n, p in params.items() if ".lora_B." in n)  # B = 0 restored
    assert scores[0] == max(scores)  # the filter's best is the best by autograd among these
    assert sorted(scores[:5], reverse=True) == scores[:5]
    assert min(scores[:5]) > max(scores[5:])
