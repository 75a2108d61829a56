"""Why SOMP loses a last token on some SecAgg+ aggregates: the noise, or what the auditor records about it?

The 4 clients × 2 texts of tests/test_fl.py's SecAgg+ test (tiny-llama, FedSGD, η = 0.01) are trained in-process;
their mean update is then perturbed in one of three ways and attacked by SOMP as the auditor's ``secagg``
aggregate: Flower's own SecAgg+ quantiser (``quantize``/``dequantize``, q = 2^29, clipping range 8, weights
unscaled), Gaussian noise of a given std per entry, or nothing. ``--recorded`` overrides the noise std the
auditor records (``meta["delta_noise_std"]``; default: what the server derives from the protocol, 6.08e-9).

Rerun: PYTHONPATH=src python benchmarks/fl_secagg_probe.py rounding --seeds 6
       PYTHONPATH=src python benchmarks/fl_secagg_probe.py gauss --std 6.08e-9 --seeds 3 --recorded 0
Prints one JSON line per attacked aggregate (ROUGE-1, texts recovered exactly, the imperfect texts, SOMP's info).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

import leaklab.fl.audit as audit
from leaklab.fl import Auditor
from leaklab.fl.client import private_batch, train_locally
from leaklab.fl.config import FlRun
from leaklab.fl.model import base_model, tensors_of
from leaklab.io import atomic_write_json
from leaklab.threat.store import load_secret, load_update

Q, CLIP, MAX_WEIGHT, B, CLIENTS = 2**29, 8.0, 2.0, 2, 4
Tensors = dict[str, torch.Tensor]


def client_replies(run: FlRun, sent: Tensors, out: Path) -> list[Tensors]:
    """Each client's new weights (float64), its private batch written where the auditor reads it."""
    cfg, replies = run.client_config(), []
    for k in range(CLIENTS):
        texts, labels = private_batch(cfg, k, 1)
        new, ids = train_locally(cfg, {n: v.clone() for n, v in sent.items()}, texts, labels, seed=k)
        replies.append({n: new[n].double().clone() for n in sent})
        secret = {"texts": texts, "token_ids": ids, "labels": labels}
        atomic_write_json(out / "secrets" / "round-001" / f"node-{k}.json", secret)
    return replies


def rounded_mean(replies: list[Tensors], seed: int) -> Tensors:
    """Flower's SecAgg+ arithmetic: each client's weights (× w/max_weight = 1) stochastically quantised, summed,
    dequantised, divided by the total weight."""
    np.random.seed(seed)  # Flower's stochastic rounding draws from numpy's global generator
    names = list(replies[0])
    total = {n: torch.zeros_like(replies[0][n]) for n in names}
    for reply in replies:
        arrays = [(reply[n] * B / MAX_WEIGHT).numpy() for n in names]
        for n, a in zip(names, dequantize(quantize(arrays, CLIP, Q), CLIP, Q), strict=True):
            total[n] += torch.from_numpy(a)
    return {n: total[n] * MAX_WEIGHT / (B * CLIENTS) for n in names}


def noised_mean(mean: Tensors, seed: int, std: float) -> Tensors:
    gen = torch.Generator().manual_seed(seed)
    return {n: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) * std for n, v in mean.items()}


def attack(run: FlRun, sent: Tensors, aggregate: Tensors, out: Path, tag: str) -> dict:
    auditor = Auditor(run, out, attack=False)
    auditor.sent(1, {n: v.clone() for n, v in sent.items()})
    auditor.aggregate(1, aggregate, [B] * CLIENTS, CLIENTS)
    path = out / "round-001" / "aggregate.safetensors"
    obs = load_update(path, check_model=False)
    row = audit.attack_update("somp", obs, load_secret(path, obs), run.options_of("somp"), 1, "aggregate")
    pairs = row.get("pairs", [])
    info = row.get("info", {})
    return {
        "aggregate": tag,
        "recorded_noise_std": obs.meta.get("delta_noise_std", 0.0),
        "rouge1": round((row.get("aggregate") or {}).get("rouge1", 0.0), 4),
        "exact": f"{sum(p['exact'] for p in pairs)}/{len(pairs)}",
        "imperfect": [f"{p['true_text']!r} -> {p['pred_text']!r}" for p in pairs if not p["exact"]],
        "denoised_rank_l1": info.get("rank_l1"),
        "candidates": info.get("candidates"),
        "omp_residual": info.get("omp_residual"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("noise", choices=["rounding", "gauss"])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--std", type=float, default=6.08e-9, help="gauss: noise std per entry of the mean update")
    ap.add_argument("--recorded", type=float, help="the noise std the auditor records (0: none)")
    args = ap.parse_args()
    if args.recorded is not None:
        recorded = args.recorded
        audit.known_noise = lambda run, examples, clients: {"delta_noise_std": recorded} if recorded > 0 else {}
    secure = f"secagg+:quantization_range={Q},max_weight={MAX_WEIGHT:g}"
    run = FlRun(
        clients=CLIENTS, rounds=1, model="tiny-llama", batch_size=B, attacks="somp", val_texts=0, defense=secure
    )
    out = Path(tempfile.mkdtemp(prefix="leaklab-secagg-probe-"))
    sent = tensors_of(base_model(run.model, run.setting, run.lora_r))
    replies = client_replies(run, sent, out)
    mean = {n: sum(r[n] for r in replies) / CLIENTS for n in sent}
    print(json.dumps(attack(run, sent, mean, out, "exact mean")), flush=True)
    for seed in range(args.seeds):
        if args.noise == "rounding":
            agg, tag = rounded_mean(replies, seed), f"SecAgg+ rounding, seed {seed}"
        else:
            agg, tag = noised_mean(mean, seed, args.std), f"Gaussian std {args.std:g}, seed {seed}"
        print(json.dumps(attack(run, sent, agg, out, tag)), flush=True)


if __name__ == "__main__":
    main()
