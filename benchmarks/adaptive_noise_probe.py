"""What the known-noise projection of ``somp-adaptive`` leaves of the span structure (issue 25 probe).

For each defense (name=value of its strength parameter) on batch 0 (smollm2-135m, rotten-tomatoes 8–32 tokens,
B = 4): the noise std the adaptive attacker derives from the record, the ranks it keeps per span group, and the
layer-1 span distances of the batch's true tokens against every other vocabulary token after the projection
(how many true tokens each threshold τ accepts, and how many false ones):

    python benchmarks/adaptive_noise_probe.py gaussian:sigma=1e-4 dpsgd:epsilon=8 dpsgd:epsilon=64
"""

from __future__ import annotations

import sys

import torch

from leaklab.attacks.gradient.adaptive import adapt
from leaklab.attacks.gradient.dager import start_attack
from leaklab.defenses import defended_update, make_defense
from leaklab.models import ModelRef

TAUS = (1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3)


def probe(spec: str, ref: ModelRef) -> None:
    name, _, kv = spec.partition(":")
    key, _, value = kv.partition("=")
    obs, secret = defended_update(
        "fedsgd", ref, "rotten-tomatoes", 4, 0, [make_defense(name, **{key: float(value)})], 8, 32
    )
    view, info = adapt(obs, 1.5, 60)
    print(spec, info["steps"][0], flush=True)
    spans, _, _ = start_attack(view)
    if spans.full_rank or spans.sub1.rank == 0:
        print("  span rank", spans.sub1.rank, "(full rank or empty: no exact span checks)")
        return
    true = sorted({t for ids in secret.token_ids for t in ids})
    dist = spans.layer1_distances(0)
    others = torch.ones_like(dist, dtype=torch.bool)
    others[true] = False
    print("  nearest false tokens' distance", [round(float(x), 3) for x in torch.sort(dist[others]).values[:3]])
    for tau in TAUS:
        hit = int((dist[true] < tau).sum())
        false = int((dist[others] < tau).sum())
        print(f"  tau {tau:g}: {hit}/{len(true)} true tokens, {false} false", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    ref = ModelRef("smollm2-135m")
    for spec in sys.argv[1:] or ["gaussian:sigma=1e-4"]:
        probe(spec, ref)


if __name__ == "__main__":
    main()
