"""Does the cost per batch grow with the vocabulary? Seconds per batch of SOMP at B=16 short on smollm2-135m and
on a model with a 262,144-token vocabulary (smollm2's Llama architecture, random weights, ~2x its parameters,
built offline from a transformers config), with the vocabulary-wide span distances unscreened (before: float64
over every token) and screened (after: a float32 screen, float64 only for the pool of tokens near the span).

    flock /work/heavy.lock python benchmarks/vocab_bench.py [--batches 1] [--out benchmarks/results/devices]

The large model reuses smollm2's tokenizer (49,152 tokens): texts only use those ids, but every vocabulary-wide
step (layer-1 filter, last-token scores, output-gradient rows) runs over all 262,144 rows. Same run, same machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BIG_VOCAB = 262_144
TARGET = 2.0


def big_model_folder() -> Path:
    """smollm2-135m's config with a 262,144-token vocabulary, seeded random weights, saved once in the cache."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from leaklab.io import cache_dir
    from leaklab.models.registry import smollm2_checkpoint, smollm2_tokenizer

    folder = cache_dir() / "models" / f"bench-llama-{BIG_VOCAB // 1024}k"
    if (folder / "config.json").exists():
        return folder
    cfg = AutoConfig.from_pretrained(str(smollm2_checkpoint()))
    cfg.vocab_size = BIG_VOCAB
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(folder))
    smollm2_tokenizer().save_pretrained(str(folder))
    return folder


def time_cells(model: str, batches: int, screened: bool) -> list[dict]:
    from leaklab.attacks.gradient import subspace
    from leaklab.bench.gradient import REGIMES
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef
    from leaklab.threat.fedsgd import fedsgd_update, private_sample

    subspace.SCREEN_MIN_ROWS = 8192 if screened else 10**12
    ref, reg, rows = ModelRef(model), REGIMES["short"], []
    for seed in range(batches):
        sample = private_sample(ref, reg.corpus, 16, seed, reg.min_tokens, reg.max_tokens)
        obs, secret = fedsgd_update(ref, sample.texts, sample.labels, seed=seed)
        rec = attack_batch("somp", obs, secret, batch=16, seed=seed)
        rows.append(
            {
                "seed": seed,
                "seconds": rec.attack_seconds,
                "status": rec.status,
                "rouge1": (rec.aggregate or {}).get("rouge1"),
                "peak_memory_mb": rec.device.get("peak_memory_mb"),
            }
        )
        print(json.dumps({"model": Path(model).name, "screened": screened, **rows[-1]}), flush=True)
    return rows


def mean(rows: list[dict]) -> float:
    return sum(r["seconds"] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "devices")
    args = parser.parse_args()
    from leaklab.models.device import current_device, device_name

    big = str(big_model_folder())
    cells = {}
    for screened in (False, True):
        for name, model in (("smollm2-135m", "smollm2-135m"), (f"llama-{BIG_VOCAB // 1024}k-random", big)):
            cells[(name, screened)] = time_cells(model, args.batches, screened)
    dev = current_device()
    lines = [
        f"# Cost against the vocabulary: SOMP, B=16 short, {args.batches} batch(es) per cell",
        "",
        f"Device: {device_name(dev)} ({dev}).",
        "",
        "Command: `flock /work/heavy.lock python benchmarks/vocab_bench.py"
        f" --batches {args.batches}` (same run, same machine).",
        "",
        "| vocabulary distances | smollm2-135m s/batch | 262k-vocab model s/batch | ratio | target <= 2x |",
        "|---|---|---|---|---|",
    ]
    for screened in (False, True):
        small, large = (
            mean(cells[("smollm2-135m", screened)]),
            mean(cells[(f"llama-{BIG_VOCAB // 1024}k-random", screened)]),
        )
        ratio = large / small
        label = "screened (after)" if screened else "float64 over all (before)"
        lines.append(
            f"| {label} | {small:.1f} | {large:.1f} | {ratio:.2f}x | {'met' if ratio <= TARGET else 'missed'} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.md").write_text("\n".join(lines) + "\n")
    (args.out / "vocab.json").write_text(
        json.dumps({f"{k[0]}|{'screened' if k[1] else 'float64'}": v for k, v in cells.items()}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
