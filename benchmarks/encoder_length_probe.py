"""Where does each text of an encoder (BERT) batch end? Per-position layer-1 candidates and their span distances.

For one FedSGD ``classify`` batch, prints the true token lengths, the per-position candidates that pass DAGER's
layer-1 threshold with their distances, the lengths :func:`leaklab.attacks.gradient.dager.encoder_lengths`
proposes, and DAGER's ROUGE-1. A token of one text can pass the loose threshold at another text's position
(a stray, far above the true tokens' float32 noise floor) and hide where a shorter text ends. The Secret is
used for scoring only.

    python benchmarks/encoder_length_probe.py --model minilm-l6 --batch-size 2 --seed 1
"""

from __future__ import annotations

import argparse

from leaklab.attacks.base import make_attack, run_attack
from leaklab.attacks.gradient.dager import DagerOptions, SpanModel, encoder_lengths
from leaklab.experiments.runner import score as score_recovery
from leaklab.models import ModelRef
from leaklab.threat import client_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    ref = ModelRef(args.model, "classify")
    obs, secret = client_update(ref, "rotten-tomatoes", args.batch_size, args.seed, args.min_tokens, args.max_tokens)
    spans = SpanModel(obs)
    opts = DagerOptions()
    cands = []
    for p in range(min(opts.max_len, spans.max_position())):
        c = spans.candidates(p, opts.tau1)
        if c.numel() == 0:
            break
        cands.append(c)
        dist = ", ".join(f"{int(t)}:{float(spans.layer1_distances(p)[t]):.1e}" for t in c)
        print(f"position {p:2d}: {dist}")
    print(f"true lengths {[len(t) for t in secret.token_ids]}; proposed lengths {encoder_lengths(spans, cands)}")
    rec = run_attack(make_attack("dager"), obs)
    print(f"DAGER ROUGE-1 {score_recovery(obs, secret, rec)['aggregate']['rouge1']:.3f}: {rec.texts}")


if __name__ == "__main__":
    main()
