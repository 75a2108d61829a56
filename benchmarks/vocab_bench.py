"""Does the cost per batch grow with the vocabulary? Seconds per batch of SOMP (and DAGER) at B=4 and B=16
short on smollm2-135m and on a model with a 262,144-token vocabulary (smollm2's Llama architecture, random
weights, ~2x its parameters, built offline from a transformers config), with the vocabulary-wide work
unrestricted (before: float64 span distances over every token, last-token softmax terms over the whole
vocabulary) and restricted to token pools (after: a float32 span screen with float64 only near the span; exact
last-token scores only on a certified pool, :func:`leaklab.attacks.gradient.dager.pooled_scores`).

    flock LOCK python benchmarks/vocab_bench.py [--batches 1] [--sizes 4,16] [--attacks somp]
        [--max-cells N] [--out benchmarks/results/devices]
    python benchmarks/vocab_bench.py --profile somp|dager [--before] [--profile-size 4]     # profile.md

Each finished cell is saved in ``vocab.json`` at once and skipped when the script runs again (resumable);
delete that file to start over. The large model reuses smollm2's tokenizer (49,152 tokens): texts only use
those ids, but every vocabulary-wide step runs over all 262,144 rows. Same run, same machine.
"""

from __future__ import annotations

import argparse
import json
import time
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


def set_pool(restricted: bool) -> None:
    """Switch every vocabulary-wide restriction on (after) or off (before)."""
    from leaklab.attacks.gradient import dager, subspace

    subspace.SCREEN_MIN_ROWS = 8192 if restricted else 10**12
    dager.LAST_TOKEN_POOL = restricted


def time_cell(attack: str, model: str, size: int, batches: int, restricted: bool) -> list[dict]:
    from leaklab.bench.gradient import REGIMES
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef
    from leaklab.threat.fedsgd import fedsgd_update, private_sample

    set_pool(restricted)
    ref, reg, rows = ModelRef(model), REGIMES["short"], []
    for seed in range(batches):
        sample = private_sample(ref, reg.corpus, size, seed, reg.min_tokens, reg.max_tokens)
        obs, secret = fedsgd_update(ref, sample.texts, sample.labels, seed=seed)
        cpu = time.process_time()
        rec = attack_batch(attack, obs, secret, batch=size, seed=seed)
        rows.append(
            {
                "seed": seed,
                "seconds": rec.attack_seconds,
                "cpu_seconds": time.process_time() - cpu,
                "status": rec.status,
                "rouge1": (rec.aggregate or {}).get("rouge1"),
                "peak_memory_mb": rec.device.get("peak_memory_mb"),
            }
        )
    return rows


def mean(rows: list[dict], field: str = "seconds") -> float | None:
    """Mean of ``field`` over the rows (None when a row lacks it: cells timed before CPU time was kept)."""
    values = [r.get(field) for r in rows]
    return None if None in values else sum(values) / len(values)


def fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{2 if unit else 1}f}{unit}"


SMALL, LARGE = "smollm2-135m", f"llama-{BIG_VOCAB // 1024}k-random"


def key(attack: str, size: int, model: str, restricted: bool) -> str:
    return f"{attack}|B={size}|{model}|{'pool' if restricted else 'full'}"


def table(cells: dict, attacks: list[str], sizes: list[int], batches: int) -> list[str]:
    from leaklab.models.device import current_device, device_name

    dev = current_device()
    lines = [
        f"# Cost against the vocabulary: B=4 and B=16 short, {batches} batch(es) per cell",
        "",
        f"Device: {device_name(dev)} ({dev}); the 2-core machine was shared with other jobs while timing (same",
        "run: the two models of a row were timed back to back, so their ratio is what to read, not the seconds).",
        "",
        f"Command: `python benchmarks/vocab_bench.py --batches {batches}` (resumable: finished cells are kept in",
        "`vocab.json`).",
        "",
        "Wall seconds of the attack per batch, and the attack's CPU seconds (the process's time over all its",
        "threads: what the work costs, less sensitive to the other jobs on the shared cores than wall time).",
        "The target is read on CPU time where it was kept, else on wall time.",
        "",
        f"| attack | B | vocabulary-wide work | {SMALL} wall s | {LARGE} wall s | wall ratio "
        f"| {SMALL} CPU s | {LARGE} CPU s | CPU ratio | target <= 2x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for attack in attacks:
        for size in sizes:
            for restricted in (False, True):
                small, large = (
                    cells.get(key(attack, size, SMALL, restricted)),
                    cells.get(key(attack, size, LARGE, restricted)),
                )
                if not small or not large:
                    continue
                wall = mean(large) / mean(small)
                cpu_small, cpu_large = mean(small, "cpu_seconds"), mean(large, "cpu_seconds")
                cpu = cpu_large / cpu_small if cpu_small and cpu_large else None
                label = "token pools (after)" if restricted else "whole vocabulary (before)"
                verdict = "reached" if (cpu if cpu is not None else wall) <= TARGET else "missed"
                cols = [attack, size, label, fmt(mean(small)), fmt(mean(large)), fmt(wall, "x")]
                cols += [fmt(cpu_small), fmt(cpu_large), fmt(cpu, "x"), verdict]
                lines.append("| " + " | ".join(str(c) for c in cols) + " |")
    return lines


def profile(attack: str, model: str, size: int) -> None:
    """Attack one batch of the large model (once to warm it), then again under cProfile; prints the top
    cumulative entries (profile.md)."""
    import cProfile
    import io
    import pstats

    from leaklab.bench.gradient import REGIMES
    from leaklab.experiments.runner import attack_batch
    from leaklab.models import ModelRef
    from leaklab.threat.fedsgd import fedsgd_update, private_sample

    ref, reg = ModelRef(model), REGIMES["short"]
    sample = private_sample(ref, reg.corpus, size, 0, reg.min_tokens, reg.max_tokens)
    obs, secret = fedsgd_update(ref, sample.texts, sample.labels, seed=0)
    attack_batch(attack, obs, secret, batch=size, seed=0)
    prof = cProfile.Profile()
    prof.enable()
    rec = attack_batch(attack, obs, secret, batch=size, seed=0)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
    print(attack, size, rec.status, f"{rec.attack_seconds:.1f}s", out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--sizes", default="4,16", help="batch sizes, comma-separated")
    parser.add_argument("--attacks", default="somp", help="gradient attacks, comma-separated")
    parser.add_argument("--profile", metavar="ATTACK", help="only profile ATTACK on one large-model batch")
    parser.add_argument("--profile-size", type=int, default=4, help="with --profile: the batch size")
    parser.add_argument("--before", action="store_true", help="with --profile: the pools switched off")
    parser.add_argument("--max-cells", type=int, default=0, help="stop after timing this many cells (0: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "devices")
    args = parser.parse_args()
    from leaklab.io import atomic_write_text

    attacks, sizes = args.attacks.split(","), [int(b) for b in args.sizes.split(",")]
    big = str(big_model_folder())
    if args.profile:
        set_pool(not args.before)
        profile(args.profile, big, args.profile_size)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "vocab.json"
    cells = json.loads(store.read_text()) if store.exists() else {}
    timed = 0
    for attack in attacks:
        for size in sizes:
            for restricted in (True, False):
                for name, model in ((SMALL, SMALL), (LARGE, big)):
                    k = key(attack, size, name, restricted)
                    if k in cells or (args.max_cells and timed >= args.max_cells):
                        continue
                    timed += 1
                    cells[k] = time_cell(attack, model, size, args.batches, restricted)
                    print(json.dumps({"cell": k, "rows": cells[k]}), flush=True)
                    atomic_write_text(store, json.dumps(cells, indent=2))
                    lines = table(cells, attacks, sizes, args.batches)
                    atomic_write_text(args.out / "vocab.md", "\n".join(lines) + "\n")
    print("\n".join(table(cells, attacks, sizes, args.batches)))


if __name__ == "__main__":
    main()
