"""Search or objective? The white-box inverter on a few private texts, with the objective J of its result and of
the true text.

Runs :class:`leaklab.attacks.embedding.whitebox.WhiteBoxInverter` as the ``whitebox`` attack does (same
bag-of-words start and pool, options as in the bench entry unless overridden by ``--opt key=value``) and prints,
per text, the token F1, the cosine, J(found) and J(true) (J = cos − λ·|x|), and the true text's tokens outside
the search vocabulary. J(true) > J(found) means the search failed, not the objective. The Secret (the true
texts) is used for scoring only.

    python benchmarks/whitebox_probe.py --n 10
    python benchmarks/whitebox_probe.py --n 10 --opt budget=24000 --opt hops=12 --opt pieces=1
    python benchmarks/whitebox_probe.py --n 10 --score "1:lame teen comedy" --score "1:lame haphazard teen comedy"
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from leaklab.attacks.embedding.bow import BowTraining
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, Scenario, sub_config, victim_targets
from leaklab.attacks.embedding.whitebox import bow_guesses, make_whitebox
from leaklab.core import parse_pairs
from leaklab.metrics.embedding import word_prf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="private texts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt", action="append", default=[], help="a white-box option, key=value (repeatable)")
    ap.add_argument(
        "--score",
        action="append",
        default=[],
        metavar="I:TEXT",
        help="only print J and cos of TEXT against private text I's vector (repeatable; no search)",
    )
    args = ap.parse_args()
    given = {"max_tokens": 16, "pool": 20, "full": True, "prior": 40, "budget": 6000, **parse_pairs(args.opt)}
    opts = EMBED_ATTACKS.get("whitebox").options(given)
    scn = Scenario(n=args.n, seed=args.seed)
    enc = scn.victim
    sample, targets = victim_targets(scn, opts.max_tokens)
    inv = make_whitebox(scn.public_data(), enc, opts)
    tok, vocab = enc.tokenizer, set(inv.vocab.tolist())
    if args.score:
        for item in args.score:
            i, _, text = item.partition(":")
            v = torch.from_numpy(targets[int(i) : int(i) + 1])
            ids = tok(text, add_special_tokens=False)["input_ids"]
            print(f"{i} J {inv.objective([ids], v)[0]:.4f} cos {inv.cosines([ids], v)[0]:.4f} {text!r}")
        return
    starts, pools = bow_guesses(scn.public_data(), enc, targets, opts.pool, sub_config(BowTraining, opts))
    t0, f1s, failures = time.perf_counter(), [], 0
    for j, true in enumerate(sample.texts):
        v = torch.from_numpy(targets[j : j + 1])
        start = tok(starts[j], add_special_tokens=False)["input_ids"]
        pool = tok(pools[j], add_special_tokens=False)["input_ids"]
        seq, cos = inv.search(start, v, pool)
        true_ids = tok(true, add_special_tokens=False)["input_ids"]
        j_true, j_found = (float(inv.objective([s], v)[0]) for s in (true_ids, seq))
        text = tok.decode(seq, skip_special_tokens=True)
        f1 = word_prf(text, true)[2]
        f1s.append(f1)
        failures += j_true > j_found
        oov = [tok.convert_ids_to_tokens(i) for i in true_ids if i not in vocab]
        print(f"{j} F1 {f1:.2f} cos {cos:.3f} J {j_found:.3f} J(true) {j_true:.3f} outside vocab {oov}")
        print(f"   {true!r} -> {text!r}")
    print(
        f"mean token F1 {np.mean(f1s):.3f}; J(true) > J(found) for {failures}/{len(f1s)}; "
        f"{time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
