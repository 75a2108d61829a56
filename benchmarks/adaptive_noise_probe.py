"""What the known-noise step of ``somp-adaptive`` finds of the batch's tokens (issue 25 probe).

For each defense (name=value of its strength parameter) on one batch (smollm2-135m, rotten-tomatoes 8–32
tokens, B = 4): the noise std the adaptive attacker derives from the record; the layer-1 token selection
with the known σ (tokens kept, how many are the batch's); and the signal-to-noise of the layer-1 group: each
true token's gain on the *clean* group (DP-SGD: clipped per sample, without noise), its energy orthogonal to
the other true tokens (``own_gains``), against the noise bound the selection uses:

    python benchmarks/adaptive_noise_probe.py gaussian:sigma=1e-4 dpsgd:epsilon=8 dpsgd:epsilon=64 [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from leaklab.attacks.gradient.adaptive import (
    AdaptiveOptions,
    _stack,
    adapt,
    known_sigma,
    null_gain_bound,
    own_gains,
    span_groups,
)
from leaklab.attacks.gradient.subspace import candidate_inputs
from leaklab.defenses import defended_update, make_defense
from leaklab.models import ModelRef, load_model


def probe(spec: str, ref: ModelRef, seed: int, z: float) -> None:
    name, _, kv = spec.partition(":")
    key, _, value = kv.partition("=")
    args = ("fedsgd", ref, "rotten-tomatoes", 4, seed)
    defense = make_defense(name, **{key: float(value)})
    obs, secret = defended_update(*args, [defense], 8, 32)
    sigma = known_sigma(obs.defenses[0], obs.batch_size)
    opts = AdaptiveOptions()
    done = adapt(obs, opts.margin, opts.impute_iters, z)
    step = done.info["steps"][0]
    true = sorted({t for ids in secret.token_ids for t in ids})
    got = set(done.tokens.tolist()) if done.tokens is not None else set()
    print(f"{spec} (batch {seed}): σ = {sigma:.3g}, {step.get('token_selection')}, kept ranks {step.get('kept_ranks')}")
    print(f"  selected {len(got)} tokens, {len(got & set(true))} of the batch's {len(true)} distinct", flush=True)
    # the clean signal: DP-SGD's per-sample clipping without its noise; the other defenses: the plain update
    rec = obs.defenses[0]
    undo = [make_defense("dpsgd", noise_multiplier=0.0, clip=rec["params"]["clip"])] if name == "dpsgd" else []
    clean, _ = defended_update(*args, undo, 8, 32)
    lm = load_model(ref)
    group = span_groups(lm, clean.gradients)[0]
    stack = _stack(clean.gradients, group)
    with torch.no_grad():
        inputs = candidate_inputs(lm.adapter, torch.tensor(true), 0).double()
    gains = own_gains(stack, inputs)
    bound = null_gain_bound(sigma, stack.shape[0], z)
    ratio = torch.sort(gains / bound).values
    print(
        f"  clean own gain / noise bound: min {float(ratio[0]):.3g}, median {float(ratio.median()):.3g}, "
        f"max {float(ratio[-1]):.3g}; {int((ratio > 1).sum())} of {len(true)} above 1",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=["gaussian:sigma=1e-4"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--z", type=float, default=6.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = ModelRef("smollm2-135m")
    for spec in a.specs:
        probe(spec, ref, a.seed, a.z)


if __name__ == "__main__":
    main()
