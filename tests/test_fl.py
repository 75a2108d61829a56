"""Flower: real federations (Ray simulation engine, and a loopback deployment) audited by AuditStrategy."""

from __future__ import annotations

import json

import pytest

from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.fl.config import FlRun, defense_of

TINY = {"model": "tiny-llama", "batch_size": 2, "attacks": "somp", "val_texts": 0}


def test_run_options_are_checked_and_defenses_listed():
    with pytest.raises(LeaklabError, match="lr must be > 0"):
        FlRun(lr=0.0)
    with pytest.raises(LeaklabError, match="fedsgd is one SGD step"):
        FlRun(local_steps=3)
    with pytest.raises(UnknownNameError, match="local-dp, none, secagg\\+, server-dp"):
        FlRun(defense="dp")
    with pytest.raises(UnknownNameError, match="unknown attack 'nope'"):
        FlRun(attacks="somp,nope")
    name, opts = defense_of("server-dp:noise=0.5,view=outside")
    assert name == "server-dp" and opts.noise == 0.5 and opts.view == "outside"


def test_private_shards_are_disjoint_across_clients_and_rounds():
    from leaklab.fl.client import private_batch

    cfg = {**FlRun(clients=3, rounds=2, **TINY).client_config()}
    batches = [private_batch(cfg, p, r)[0] for p in range(3) for r in (1, 2)]
    assert all(len(b) == 2 for b in batches)
    assert len({t for b in batches for t in b}) == 12


def test_server_dp_wraps_inside_or_outside_the_audit(tmp_path):
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping as Dp

    from leaklab.fl import Auditor, AuditStrategy
    from leaklab.fl.server import message_strategy

    for view, outer, inner in (
        ("inside", Dp, AuditStrategy),
        ("outside", AuditStrategy, Dp),
        ("both", AuditStrategy, Dp),
    ):
        run = FlRun(defense=f"server-dp:view={view}", **TINY)
        auditor = Auditor(run, tmp_path / view, attack=False)
        strategy = message_strategy(run, auditor)
        assert type(strategy) is outer and type(strategy.strategy) is inner
        if view != "inside":
            assert strategy.capture == "aggregate"  # it sees only the noised aggregate
        if view == "both":  # and, inside the DP wrapper, each clipped client update
            audited = strategy.strategy.strategy
            assert type(audited) is AuditStrategy and audited.capture == "clients" and audited.auditor is auditor


def test_auditor_turns_a_client_reply_into_its_fedsgd_gradient(tmp_path):
    """Δ = θ_sent − θ_reply of leaklab's ClientApp step, seen through the FedSGD view, is the gradient leaklab's
    FedSGD victim computes on the same texts (the slow obvious reference)."""
    from leaklab.attacks.gradient.views import fedsgd_view
    from leaklab.fl import Auditor
    from leaklab.fl.client import private_batch, train_locally
    from leaklab.fl.model import base_model, tensors_of
    from leaklab.models.registry import ModelRef
    from leaklab.threat.settings import make_update
    from leaklab.threat.store import load_update

    run = FlRun(clients=1, rounds=1, **TINY)
    auditor = Auditor(run, tmp_path, attack=False)
    sent = tensors_of(base_model(run.model, run.setting, run.lora_r))
    auditor.sent(1, sent)
    texts, labels = private_batch(run.client_config(), 0, 1)
    reply, _ = train_locally(run.client_config(), sent, texts, labels, seed=0)
    auditor.client(1, 7, reply, len(texts))
    obs = load_update(tmp_path / "round-001" / "node-7.safetensors")
    assert obs.setting == "fedsgd" and obs.batch_size == 2 and obs.flags.learning_rate == run.lr
    ref, _ = make_update("fedsgd", ModelRef(run.model), texts)
    name = "model.layers.0.self_attn.k_proj.weight"
    g, r = fedsgd_view(obs)[0].gradients[name].double(), ref.gradients[name].double()
    assert float((g - r).norm() / r.norm()) < 1e-3


def test_auditor_attacks_the_first_client_updates_and_the_aggregate_unless_told_not_to(tmp_path):
    from leaklab.fl import Auditor

    auditor = Auditor(FlRun(attack_clients=1, **TINY), tmp_path / "a")
    assert auditor._attack_this(1, "node-1") and auditor._attack_this(1, "aggregate")
    assert auditor._attack_this(1, "node-1")  # the chosen client stays chosen
    assert not auditor._attack_this(1, "node-2") and auditor._attack_this(2, "node-2")
    quiet = Auditor(FlRun(attack_aggregate=False, **TINY), tmp_path / "b")
    assert quiet._attack_this(1, "node-5") and not quiet._attack_this(1, "aggregate")


def test_rounds_without_any_reply_count_as_missing_every_client():
    from leaklab.fl.report import missing_replies

    run = FlRun(clients=8, rounds=3, **TINY)
    assert missing_replies(run, {1: 8, 2: 6}) == {"2": 2, "3": 8}
    assert missing_replies(run, {1: 8, 2: 8, 3: 8}) == {}


def test_releasing_grid_drops_a_rounds_replies_when_the_next_round_is_sent():
    """Flower's Strategy.start keeps a round's reply list until the next round's replies have all arrived; the
    grid the auditing strategy runs on empties it (the caller's reference too) before sending the next round."""
    from leaklab.fl.audit import ReleasingGrid

    class Grid:
        run_id = 7

        def __init__(self):
            self.sent = 0

        def send_and_receive(self, messages, *, timeout=None):
            self.sent += 1
            return [f"reply {self.sent}.{m}" for m in messages]

    grid = ReleasingGrid(Grid())
    first = grid.send_and_receive(["a", "b"], timeout=1.0)
    assert first == ["reply 1.a", "reply 1.b"]
    second = grid.send_and_receive(["c"])
    assert first == [] and second == ["reply 2.c"]
    assert grid.run_id == 7 and grid.sent == 2  # everything else is the wrapped grid's


def test_deferred_auditor_stores_updates_holds_none_and_attacks_them_from_their_files(tmp_path):
    """While the federation runs a deferred auditor writes each update and keeps only its path (no Observation
    stays alive); afterwards it attacks the files and recovers the client's texts."""
    import gc

    from leaklab.fl import Auditor
    from leaklab.fl.client import private_batch, train_locally
    from leaklab.fl.model import base_model, tensors_of
    from leaklab.threat.observation import Observation

    run = FlRun(clients=1, rounds=1, attack_aggregate=False, **TINY)
    auditor = Auditor(run, tmp_path, defer=True)
    auditor.sent(1, tensors_of(base_model(run.model, run.setting, run.lora_r)))
    texts, labels = private_batch(run.client_config(), 0, 1)
    reply, ids = train_locally(run.client_config(), auditor._sent[1], texts, labels, seed=0)
    auditor.secrets_dir.joinpath("round-001").mkdir(parents=True)
    gc.collect()
    before = [o for o in gc.get_objects() if isinstance(o, Observation)]  # other tests' cached ones, kept alive
    (auditor.secrets_dir / "round-001" / "node-3.json").write_text(
        json.dumps({"texts": texts, "token_ids": ids, "labels": labels}), encoding="utf-8"
    )
    auditor.client(1, 3, reply, len(texts))
    assert auditor.records == [] and auditor.pending == [(1, "node-3", tmp_path / "round-001" / "node-3.safetensors")]
    assert auditor.pending[0][2].exists()
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Observation) and not any(o is b for b in before)]
    auditor.attack_stored()
    assert auditor.pending == [] and [r["target"] for r in auditor.records] == ["node-3"]
    assert auditor.records[0]["status"] == "recovered" and auditor.records[0]["aggregate"]["rouge1"] == 1.0
    assert json.loads((tmp_path / "records.json").read_text())[0]["target"] == "node-3"


@pytest.fixture(scope="module")
def fedsgd_run(tmp_path_factory):
    from leaklab.fl.simulate import simulate

    out = tmp_path_factory.mktemp("fl") / "run"
    return out, simulate(FlRun(clients=4, rounds=2, out=str(out), **TINY), num_cpus=2, client_cpus=1.0)


def test_simulation_captures_every_client_update_and_recovers_its_texts(fedsgd_run):
    import ray

    from leaklab.threat.store import load_secret, load_update

    out, summary = fedsgd_run
    assert not ray.is_initialized()
    clients = [r for r in summary["records"] if r["target"] != "aggregate"]
    assert len(clients) == 8 and {r["round"] for r in clients} == {1, 2}
    assert all(r["status"] == "recovered" and r["aggregate"]["rouge1"] == 1.0 for r in clients)
    texts: list[str] = []
    for rnd in (1, 2):
        files = sorted((out / f"round-{rnd:03d}").glob("node-*.safetensors"))
        assert len(files) == 4
        for f in files:
            obs = load_update(f, check_model=False)
            assert obs.setting == "fedsgd" and obs.batch_size == 2 and obs.flags.batch_size_known
            assert obs.flags.learning_rate == 0.01
            texts += load_secret(f).texts  # kept apart from the update, for scoring only
    assert len(set(texts)) == 16
    round2 = load_update(out / "round-002" / "aggregate.safetensors", check_model=False)
    assert (out / "round-002" / "global" / "config.json").exists() and round2.model.name.endswith("global")
    assert (out / "results.md").exists() and (out / "leakage.png").exists()


def test_secagg_plus_leaves_only_the_sum_which_is_attacked_as_one_batch(tmp_path):
    """Flower's SecAgg+ hides each client's update; the server's aggregate (the mean update of 4 clients × 2
    texts) is attacked as one batch of 8: SOMP recovers the 8 texts from it — which client held which is not
    recovered. SecAgg+'s stochastic rounding (random per run) tilts the denoised span most along each text's
    weakest input, its last one; the span checks' noise tolerance keeps it (in-process, seeded:
    test_secagg_rounding_with_its_noise_recorded_keeps_every_last_token). Bound: ROUGE-1 1.0, 7 of 8 exact."""
    from leaklab.fl.simulate import simulate

    # quantisation fine enough (and weights unscaled) that SecAgg+ itself does not blur the update
    secure = "secagg+:quantization_range=536870912,max_weight=2"
    run = FlRun(clients=4, rounds=1, out=str(tmp_path), defense=secure, **TINY)
    summary = simulate(run, num_cpus=2, client_cpus=1.0)
    assert not list((tmp_path / "round-001").glob("node-*"))
    (record,) = summary["records"]
    assert record["target"] == "aggregate" and record["observation"]["batch_size"] == 8
    assert record["status"] == "recovered" and record["aggregate"]["rouge1"] == 1.0, record["aggregate"]
    assert len(record["recovered"]) == 8
    assert sum(p["exact"] for p in record["pairs"]) >= 7, record["pairs"]
    assert record["observation"]["meta"]["delta_noise_std"] > 0  # SecAgg+'s rounding, known to the server


def test_secagg_rounding_with_its_noise_recorded_keeps_every_last_token(tmp_path):
    """The test above without Flower's runtime and with its randomness seeded: the 4 clients' replies trained
    in-process, their weights rounded by Flower's own SecAgg+ quantiser (q = 2^29, clipping range 8), and the
    mean attacked as the auditor's aggregate, whose recorded rounding std makes the denoiser cut at the true
    rank. With span thresholds at float32 exactness alone, this seed lost the final token of 2 of the 8 texts
    (each text's last input token fell just outside the noisy span); with the noise tolerance all 8 are exact."""
    import numpy as np
    import torch
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from leaklab.attacks.gradient.views import setting_view
    from leaklab.fl import Auditor
    from leaklab.fl.audit import attack_update
    from leaklab.fl.client import private_batch, train_locally
    from leaklab.fl.model import base_model, tensors_of
    from leaklab.io import atomic_write_json
    from leaklab.threat.store import load_secret, load_update

    q, clip, clients = 2**29, 8.0, 4
    run = FlRun(clients=clients, rounds=1, defense=f"secagg+:quantization_range={q},max_weight=2", **TINY)
    sent = {n: v.detach().clone() for n, v in tensors_of(base_model(run.model, run.setting, run.lora_r)).items()}
    cfg, names, total = (
        run.client_config(),
        list(sent),
        {n: torch.zeros(sent[n].shape, dtype=torch.float64) for n in sent},
    )
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    for k in range(clients):
        texts, labels = private_batch(cfg, k, 1)
        new, ids = train_locally(cfg, {n: v.clone() for n, v in sent.items()}, texts, labels, seed=k)
        arrays = [new[n].double().numpy() for n in names]  # max_weight = B = 2: weights unscaled
        for n, a in zip(names, dequantize(quantize(arrays, clip, q), clip, q), strict=True):
            total[n] += torch.from_numpy(a)
        atomic_write_json(
            tmp_path / "secrets" / "round-001" / f"node-{k}.json", {"texts": texts, "token_ids": ids, "labels": labels}
        )
    auditor = Auditor(run, tmp_path, attack=False)
    auditor.sent(1, sent)
    auditor.aggregate(1, {n: t / clients for n, t in total.items()}, [2] * clients, clients)
    path = tmp_path / "round-001" / "aggregate.safetensors"
    obs = load_update(path, check_model=False)
    assert obs.meta["delta_noise_std"] > 0
    _, info = setting_view(obs)
    assert info["denoised_ranks"][0] < 64 and all(t > 1e-3 for t in info["span_tolerance"].values())
    row = attack_update("somp", obs, load_secret(path, obs), run.options_of("somp"), 1, "aggregate")
    assert row["status"] == "recovered" and [p["exact"] for p in row["pairs"]] == [True] * 8, row["pairs"]


def test_deployment_on_loopback_captures_updates(tmp_path):
    """flower-superlink + 2 flower-supernode processes on 127.0.0.1 (insecure), `flwr run` of the example app;
    every process started is stopped."""
    from pathlib import Path

    from leaklab.fl.deploy import Deployment

    app = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
    deployment = Deployment(nodes=2, home=tmp_path / "flwr")
    with deployment:
        done = deployment.run(app, {"out": str(tmp_path / "run"), "clients": 2, "rounds": 1}, timeout=400)
        started = deployment.descendants()  # SuperLink, SuperExec, SuperNodes and what they spawned
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(not p.is_running() or p.status() == "zombie" for p in started)
    assert len(list((tmp_path / "run" / "round-001").glob("node-*.safetensors"))) == 2
    records = json.loads((tmp_path / "run" / "records.json").read_text())
    assert any(r["target"] != "aggregate" and r["status"] == "recovered" for r in records)


def _node_updates(folder):
    from leaklab.threat.store import load_update

    return [load_update(f, check_model=False) for f in sorted(folder.glob("node-*.safetensors"))]


@pytest.mark.parametrize(
    ("setting", "extra", "floor"),
    [
        ("fedavg", {"local_steps": 3}, 1.0),  # three local SGD steps: SOMP still recovers every text exactly
        ("lora", {"lora_r": 64}, 0.9),  # rank 64 > the batch's ≤ 22 tokens: the adapter update is not saturated
    ],
)
def test_fedavg_and_lora_updates_through_flower_are_attacked_in_their_setting(tmp_path, setting, extra, floor):
    """A real Flower simulation in the FedAvg (k local steps) and LoRA (only adapter tensors sent) settings: the
    auditor stores each client's reply as an update of that setting, with the protocol facts the server knows,
    and SOMP recovers each client's texts from it."""
    from leaklab.fl.model import shared_names, working_model
    from leaklab.fl.simulate import simulate

    run = FlRun(clients=2, rounds=1, setting=setting, capture="clients", out=str(tmp_path), **extra, **TINY)
    summary = simulate(run, num_cpus=2, client_cpus=1.0)
    updates = _node_updates(tmp_path / "round-001")
    assert len(updates) == 2
    for obs in updates:
        assert obs.setting == setting and obs.batch_size == 2
        assert obs.flags.local_steps == run.local_steps and obs.meta["optimizer_steps"] == run.local_steps
    if setting == "lora":
        sent = set(updates[0].gradients)
        assert sent == set(shared_names(working_model(run.model, "lora", run.lora_r)))
        assert all("lora_" in name for name in sent) and updates[0].meta["lora"]["r"] == 64
    records = summary["records"]
    assert len(records) == 2 and all(r["status"] == "recovered" for r in records)
    assert sum(r["aggregate"]["rouge1"] for r in records) / 2 >= floor


def test_server_dp_inside_auditor_sees_clipped_updates_outside_only_the_noised_mean(tmp_path):
    """Flower's DifferentialPrivacyServerSideFixedClipping (z = 1, C = 0.05, 2 clients), one federation audited at
    both places (view=both): wrapped inside it, the auditor gets each clipped client update before the noise, and
    clipping alone does not stop SOMP; wrapped around it, it gets only the mean with N(0, (z·C/n)²) added, and
    SOMP recovers nothing from it."""
    import torch

    from leaklab.fl.simulate import simulate
    from leaklab.threat.store import load_update

    z, clip, n = 1.0, 0.05, 2
    run = FlRun(
        clients=n,
        rounds=1,
        defense=f"server-dp:noise={z},clip={clip},view=both",
        out=str(tmp_path),
        **{**TINY, "attack_budget_s": 5.0},
    )
    summary = simulate(run, num_cpus=2, client_cpus=1.0)
    updates = _node_updates(tmp_path / "round-001")
    assert len(updates) == n
    for obs in updates:
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in obs.gradients.values()))
        assert float(norm) <= clip * 1.001  # clipped by Flower before the inner (audited) strategy
    clients = [r for r in summary["records"] if r["target"] != "aggregate"]
    assert len(clients) == n
    assert all(r["status"] == "recovered" and r["aggregate"]["rouge1"] == 1.0 for r in clients)

    agg = load_update(tmp_path / "round-001" / "aggregate.safetensors", check_model=False)
    std = z * clip / n
    assert agg.meta["delta_noise_std"] == pytest.approx(std)  # the server knows the noise it adds
    measured = torch.cat([g.double().flatten() for g in agg.gradients.values()]).std()
    assert float(measured) == pytest.approx(std, rel=0.02)  # the noised mean, not the clean one of the inside view
    (record,) = [r for r in summary["records"] if r["target"] == "aggregate"]
    assert record["status"] != "recovered" or record["aggregate"]["rouge1"] < 0.2
    assert summary["defense"]["epsilon_total"] > 0
