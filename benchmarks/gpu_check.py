"""GPU check: seconds per batch and peak GPU memory of SOMP and DAGER on smollm2-135m, on a CUDA device.

Cells: B = 1, 2, 4, 8, 16 on short texts (rotten-tomatoes, 8-32 tokens) and B = 4, 16 on long texts
(bbc-news paragraphs, 64-128 tokens), one batch each. Writes benchmarks/results/gpu/gpu.json and gpu.md with
the card's name. Refuses to run without CUDA (exit 2): CPU timings live in benchmarks/results/gradient/.

    python benchmarks/gpu_check.py [--device cuda:0] [--attacks somp,dager] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "gpu"
CELLS = [("short", b) for b in (1, 2, 4, 8, 16)] + [("long", 4), ("long", 16)]


def run_cell(attack: str, regime: str, batch: int, seed: int, device) -> dict:
    import torch

    from leaklab.bench.gradient import REGIMES
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef
    from leaklab.threat.fedsgd import fedsgd_update, private_sample

    reg = REGIMES[regime]
    ref = ModelRef("smollm2-135m")
    sample = private_sample(ref, reg.corpus, batch, seed, reg.min_tokens, reg.max_tokens)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    obs, secret = fedsgd_update(ref, sample.texts, sample.labels, seed=seed)
    victim = time.perf_counter() - t0
    record = attack_batch(attack, obs, secret, batch=batch, seed=seed, victim_seconds=victim)
    torch.cuda.synchronize(device)
    return {
        "attack": attack,
        "regime": regime,
        "batch_size": batch,
        "seed": seed,
        "status": record.status,
        "reason": record.reason,
        "rouge1": (record.aggregate or {}).get("rouge1"),
        "attack_seconds": record.attack_seconds,
        "victim_seconds": round(victim, 3),
        "peak_gpu_mb": record.device.get("peak_memory_mb"),
    }


def write(rows: list[dict], card: str, device: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps({"card": card, "device": device, "cells": rows}, indent=2))
    lines = [
        f"# GPU check on {card} ({device})",
        "",
        "Command: `python benchmarks/gpu_check.py` (smollm2-135m, one batch per cell).",
        "",
        "| attack | regime | B | status | ROUGE-1 | s/batch (attack) | victim s | peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r1 = f"{r['rouge1']:.3f}" if r["rouge1"] is not None else f"n/a ({r['reason']})"
        lines.append(
            f"| {r['attack']} | {r['regime']} | {r['batch_size']} | {r['status']} | {r1} | "
            f"{r['attack_seconds']:.2f} | {r['victim_seconds']:.2f} | {r['peak_gpu_mb']} |"
        )
    (OUT / "gpu.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attacks", default="somp,dager")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    from leaklab.errors import LeaklabError
    from leaklab.models.device import device_name, set_device

    try:
        device = set_device(args.device)
    except LeaklabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type != "cuda":
        print("error: the GPU check needs a CUDA device", file=sys.stderr)
        return 2
    card = device_name(device)
    rows: list[dict] = []
    for attack in args.attacks.split(","):
        for regime, batch in CELLS:
            rows.append(run_cell(attack, regime, batch, args.seed, device))
            print(json.dumps(rows[-1]), flush=True)
            write(rows, card, str(device))
    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
