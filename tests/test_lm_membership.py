"""LM membership inference and canary extraction: scores against hand-computed values, the batched token
statistics against a one-text-at-a-time reference, an overfit fine-tune that LOSS catches, a split free of
length and order shift, DP accounting equal to Opacus's, and the user-facing command with its bad inputs."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from cli_helpers import run_leaklab

from leaklab.attacks.membership import LMAccess, run_membership_attack, score_texts
from leaklab.attacks.membership.extraction import canary_exposure, reproduces
from leaklab.metrics.membership import (
    exposure_exact,
    exposure_fitted,
    exposure_sampled,
    membership_report,
    threshold_at_fpr,
)
from leaklab.models.causal import CausalLM, TokenStats, encode_texts, load_causal_lm, sequence_nll, token_stats
from leaklab.threat.finetune import Canary, FinetuneConfig, finetune, load_secret, membership_split


def _stub(name: str = "stub") -> CausalLM:
    from leaklab.models.registry import smollm2_tokenizer

    return CausalLM(name, torch.nn.Linear(1, 1), smollm2_tokenizer())


def _access_with(stats: dict[str, TokenStats], ref: dict[str, TokenStats] | None = None) -> LMAccess:
    """An access whose forward-pass cache already holds known token statistics (no model runs)."""
    access = LMAccess(_stub("target"), _stub("base") if ref else None)
    for text, s in stats.items():
        access._stats[(id(access.target.model), text)] = s
    for text, s in (ref or {}).items():
        access._stats[(id(access.base.model), text)] = s
    return access


LOGP = np.array([-1.0, -5.0, -2.0, -0.5, -3.0])
MU = np.array([-2.0, -2.0, -1.0, -1.0, -4.0])
SIGMA = np.array([1.0, 2.0, 0.5, 1.0, 2.0])


def test_scores_against_hand_computed_values():
    text = "the the the the the the"
    access = _access_with({text: TokenStats(LOGP, MU, SIGMA)}, {text: TokenStats(LOGP - 1.0, MU, SIGMA)})
    one = [text]
    assert score_texts(access, "loss", one)[0] == pytest.approx(-2.3)  # mean of LOGP
    # zlib: the 23-byte text compresses to len(zlib.compress(...)) bytes
    assert score_texts(access, "zlib", one)[0] == pytest.approx(-2.3 / len(zlib.compress(text.encode())))
    # Min-K% with k = 0.4: the 2 lowest of 5 log-probs, -5 and -3
    assert score_texts(access, "min-k", one, {"k": 0.4})[0] == pytest.approx(-4.0)
    # Min-K%++: z = (LOGP - MU) / SIGMA = [1, -1.5, -2, 0.5, 0.5]; the 2 lowest are -2 and -1.5
    assert score_texts(access, "min-k++", one, {"k": 0.4})[0] == pytest.approx(-1.75)
    # reference: the base's mean NLL (3.3) minus the fine-tune's (2.3)
    assert score_texts(access, "reference", one)[0] == pytest.approx(1.0)


def test_rmia_scores_by_hand():
    from leaklab.attacks.membership.shadow import rmia_scores

    # a = 1: Pr(x) is the shadows' mean. LR(x) = [0.5/0.25, 0.1/0.2] = [2, 0.5]; LR(z) = [0.2/0.2, 0.3/0.1] = [1, 3]
    got = rmia_scores(
        np.array([0.5, 0.1]), np.array([[0.25, 0.2]]), np.array([0.2, 0.3]), np.array([[0.2, 0.1]]), a=1.0, gamma=1.0
    )
    np.testing.assert_allclose(got, [0.5, 0.0])  # 2/1 > 1 but 2/3 is not; 0.5/1 and 0.5/3 are not
    # a = 0: Pr(x) = ½(mean + 1), so LR(x) = [0.5/0.625, 0.1/0.6]
    got = rmia_scores(
        np.array([0.5, 0.1]), np.array([[0.25, 0.2]]), np.array([0.2]), np.array([[0.2]]), a=0.0, gamma=1.0
    )
    np.testing.assert_allclose(got, [1.0, 0.0])  # LR(z) = 0.2/0.6 = 1/3 < 0.8, > 1/6


def test_missing_grant_cannot_run_and_constant_scores_have_no_signal():
    stats = {t: TokenStats(LOGP, MU, SIGMA) for t in ("a b", "c d")}
    access = _access_with(stats)
    ref = run_membership_attack(access, "reference", list(stats))
    assert ref.status == "could_not_run" and "base model" in ref.reason and ref.scores is None
    assert run_membership_attack(access, "loss", list(stats)).status == "no_signal"
    assert run_membership_attack(access, "rmia", list(stats)).status == "could_not_run"


def test_exposure_and_threshold_by_hand():
    # secret loss 1.5 among 3 others (1, 2, 3): rank 2 in a space of 4 → log2 4 − log2 2 = 1 bit
    assert exposure_exact(1.5, [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert exposure_exact(0.5, [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    # sampled: 1 of 4 samples beats it in a space of 1024 → rank 1 + 256 → 10 − log2 257
    value, bound = exposure_sampled(1.5, [1.0, 2.0, 3.0, 4.0], 1024)
    assert value == pytest.approx(10 - math.log2(257)) and not bound
    assert exposure_sampled(0.1, [1.0, 2.0], 1024) == (pytest.approx(10.0), True)
    # fitted: samples 1..5 → normal μ = 3, σ = √2.5; a loss of 3 has Φ = ½ → rank 1 + 512; far below → the ceiling
    assert exposure_fitted(3.0, [1.0, 2.0, 3.0, 4.0, 5.0], 1024) == pytest.approx(10 - math.log2(513))
    z = (1.0 - 3.0) / math.sqrt(2.5)
    share = 0.5 * math.erfc(-z / math.sqrt(2))
    assert exposure_fitted(1.0, [1.0, 2.0, 3.0, 4.0, 5.0], 1024) == pytest.approx(10 - math.log2(1 + 1024 * share))
    assert exposure_fitted(-1e3, [1.0, 2.0, 3.0, 4.0, 5.0], 1024) == pytest.approx(10.0)
    t = threshold_at_fpr(np.arange(100.0), 0.05)
    assert np.sum(np.arange(100.0) > t) == 5
    assert reproduces(" 4812-0937", "4812-0937") and not reproduces(" 4812-09371", "4812-0937")


def test_membership_report_intervals_hold_the_value():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 50 + [0] * 50)
    scores = rng.normal(size=100) + labels
    rep = membership_report(scores, labels, rounds=200)
    for m in rep.values():
        assert m["low"] <= m["value"] <= m["high"]
    assert 0.6 < rep["auc"]["value"] < 0.95


@pytest.fixture(scope="module")
def tiny() -> CausalLM:
    return load_causal_lm("tiny-llama")


def test_token_stats_match_one_text_at_a_time(tiny):
    texts = ["a short one", "a somewhat longer text about a film that drags", "x"]
    fast = token_stats(tiny, texts, batch_size=2)  # batched, length-sorted, padded
    for text, s in zip(texts, fast, strict=True):
        ids = torch.tensor([encode_texts(tiny, [text])[0]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, :-1].double(), -1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = ((p * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
        np.testing.assert_allclose(s.logp, logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy(), atol=1e-6)
        np.testing.assert_allclose(s.mu, mu.numpy(), atol=1e-6)
        np.testing.assert_allclose(s.sigma, sigma.numpy(), atol=1e-5)
    totals = sequence_nll(tiny, texts)
    np.testing.assert_allclose(totals, [-s.logp.sum() for s in fast], rtol=1e-4)


def test_exposure_over_an_enumerated_space(tiny):
    canary = Canary("my pin is", "42", 1)
    got = canary_exposure(tiny, [canary], digits=2)[0]
    assert got["exact"] and got["max_exposure"] == pytest.approx(math.log2(100))
    secrets = [f"{a}{b}" for a in "0123456789" for b in "0123456789"]
    stats = token_stats(tiny, [f"my pin is {s}" for s in secrets])
    losses = {s: -st.logp.sum() for s, st in zip(secrets, stats, strict=True)}
    rank = 1 + sum(v <= losses["42"] + 1e-9 for k, v in losses.items() if k != "42")
    assert got["exposure"] == pytest.approx(math.log2(100) - math.log2(rank), abs=1e-6)


def test_split_has_no_length_or_order_shift(tiny):
    cfg = FinetuneConfig(model="tiny-llama", members=150, canary_repeats="1,4", canaries_per_repeat=2)
    secret = membership_split(cfg, tiny)
    assert len(secret.members) == len(secret.non_members) == 150
    assert not set(secret.members) & set(secret.non_members)
    assert secret.shift["length"]["p"] > 0.05 and secret.shift["order"]["p"] > 0.05
    assert [c.repeats for c in secret.canaries] == [1, 1, 4, 4]
    assert len({c.secret for c in secret.canaries}) == 4
    assert len({c.prefix for c in secret.canaries}) == 4  # one prefix each: prompting can return every secret


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft") / "tiny-ft"
    cfg = FinetuneConfig(model="tiny-llama", members=16, epochs=15, lr=3e-3, batch_size=16, max_tokens=24)
    record = finetune(cfg, folder)
    return folder, record


def test_overfit_fine_tune_is_caught_by_loss(overfit):
    folder, record = overfit
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert record["epoch_loss"][-1] < record["epoch_loss"][0]
    secret = load_secret(folder)
    access = LMAccess(load_causal_lm(str(folder)))
    texts = list(secret.members) + list(secret.non_members)
    out = run_membership_attack(access, "loss", texts)
    labels = [1] * len(secret.members) + [0] * len(secret.non_members)
    assert out.ok and membership_report(out.scores, labels, rounds=50)["auc"]["value"] > 0.9


def test_dp_fine_tune_epsilon_is_opacus_accountants(tmp_path):
    from opacus.accountants import RDPAccountant

    cfg = FinetuneConfig(
        model="tiny-llama",
        members=8,
        method="lora",
        lora_r=2,
        epochs=2,
        batch_size=4,
        epsilon=4.0,
        delta=1e-3,
        max_tokens=16,
    )
    dp = finetune(cfg, tmp_path / "dp")["dp"]
    acc = RDPAccountant()
    acc.history = [(dp["noise_multiplier"], dp["sample_rate"], dp["accounted_steps"])]
    assert dp["accounted_steps"] == 2 * round(1 / dp["sample_rate"])
    assert dp["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-9)
    assert dp["epsilon"] == pytest.approx(4.0, rel=0.05) and dp["epsilon"] <= 4.0 + 1e-6


def _lm(monkeypatch, capsys, *args):
    return run_leaklab(monkeypatch, capsys, "lm", *args)


def test_membership_command_on_a_fine_tuned_folder(overfit, tmp_path, monkeypatch, capsys):
    folder, _ = overfit
    secret = load_secret(folder)
    cand = tmp_path / "candidates.txt"
    cand.write_text("\n".join([*secret.members[:4], *secret.non_members[:4]]) + "\n")
    known = tmp_path / "known.txt"
    known.write_text("\n".join(secret.non_members[4:]) + "\n")
    code, out, err = _lm(
        monkeypatch,
        capsys,
        "membership",
        "--model",
        str(folder),
        "--candidates",
        str(cand),
        "--non-members",
        str(known),
        "--fpr",
        "0.1",
        "--attack",
        "loss",
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["grants"] == {"base_model": False, "public_data": False}
    decisions = [r["member"] for r in res["candidates"]]
    assert sum(decisions[:4]) >= 3 and sum(decisions[4:]) <= 1
    code, out, _ = _lm(
        monkeypatch, capsys, "membership", "--model", str(folder), "--candidates", str(cand), "--base", "tiny-llama"
    )
    assert code == 0 and "reference membership scores" in out and "no decision" in out


def test_membership_command_bad_inputs(overfit, tmp_path, monkeypatch, capsys):
    from leaklab.models.registry import ModelRef, load_model

    folder, _ = overfit
    cand = tmp_path / "c.txt"
    cand.write_text("some text\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bert = tmp_path / "bert"
    encoder = load_model(ModelRef("tiny-bert", task="classify"))
    encoder.model.save_pretrained(str(bert))
    encoder.tokenizer.save_pretrained(str(bert))
    cases = [
        (["--model", str(bert), "--candidates", str(cand)], "not a causal language model"),
        (["--model", str(folder), "--candidates", str(cand), "--base", "tiny-gpt2"], "another tokenizer"),
        (["--model", str(folder), "--candidates", str(empty)], "holds no text"),
    ]
    for args, needle in cases:
        code, _, err = _lm(monkeypatch, capsys, "membership", *args)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_causal_lm(str(folder)).model.state_dict()


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_epoch_snapshot_is_the_shorter_run(tmp_path, method):
    from leaklab.threat.finetune import load_record

    small = {"model": "tiny-llama", "members": 6, "batch_size": 4, "max_tokens": 12, "method": method, "lora_r": 2}
    two, one = FinetuneConfig(epochs=2, **small), FinetuneConfig(epochs=1, **small)
    finetune(two, tmp_path / "two", snapshots={1: tmp_path / "snap1"})
    finetune(one, tmp_path / "one")
    _assert_same_weights(tmp_path / "snap1", tmp_path / "one")
    assert load_record(tmp_path / "snap1")["config"] == one.to_dict()
    assert load_secret(tmp_path / "snap1") == load_secret(tmp_path / "one")
    with pytest.raises(Exception, match="snapshot epochs"):
        finetune(one, tmp_path / "bad", snapshots={1: tmp_path / "x"})


@pytest.mark.parametrize("dp", [False, True])
def test_interrupted_fine_tune_resumes_to_the_same_model(tmp_path, dp):
    extra = {"method": "lora", "lora_r": 2, "epsilon": 8.0} if dp else {}  # DP: Poisson sampling and noise resume too
    cfg = FinetuneConfig(model="tiny-llama", members=6, epochs=3, batch_size=3, max_tokens=12, **extra)
    straight = finetune(cfg, tmp_path / "straight")

    def stop(what: str, done: int, total: int) -> None:
        if done > 2 * 2:  # a step of the third epoch (6 texts, 2 steps per epoch): two epochs were saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tmp_path / "resumed", progress=stop)
    assert (tmp_path / ".resumed.resume" / "state.json").is_file() and not (tmp_path / "resumed").exists()
    record = finetune(cfg, tmp_path / "resumed")
    assert record["resumed_epochs"] == 2 and len(record["epoch_seconds"]) == 3
    assert not (tmp_path / ".resumed.resume").exists()
    _assert_same_weights(tmp_path / "resumed", tmp_path / "straight")
    assert record.get("dp") == straight.get("dp")  # the same ε over the same accounted steps


def test_lm_commands_take_device(overfit, tmp_path, monkeypatch, capsys):
    from leaklab.models import device

    monkeypatch.setenv(device.ENV, "auto")  # --device is passed on through the environment: restored after
    monkeypatch.setitem(device._CHOSEN, "device", None)
    folder, _ = overfit
    cand = tmp_path / "c.txt"
    cand.write_text("some text\nanother text\n")
    code, out, err = _lm(monkeypatch, capsys, "membership", "--model", str(folder), "--candidates", str(cand),
                         "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    assert len(json.loads(out)["candidates"]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in ("finetune", "attack", "membership"):
        code, _, err = _lm(monkeypatch, capsys, cmd, "--device", "cuda")
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "CUDA is not available" in lines[0], (cmd, err)


def test_length_grouped_backward_equals_one_padded_pass(tiny):
    from leaklab.models.causal import pad_batch, sample_losses
    from leaklab.threat.finetune import batch_backward

    texts = ["a", "a film that drags on and on for far too long", "fine", "not bad at all, really", "ok then"]
    seqs = encode_texts(tiny, texts)
    model = tiny.model
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        reference = sample_losses(model, *pad_batch(seqs, 0)).mean()  # the slow obvious way: one padded pass
        reference.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        got_loss = batch_backward(model, seqs, 0, groups=3)
        assert got_loss == pytest.approx(float(reference), rel=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
