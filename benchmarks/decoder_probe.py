"""The decoder attack on a few private texts, for trying its correction and search options before a bench run.

Runs the ``decoder`` attack (GRU, the bench entry's training and correction settings unless overridden by
``key=value`` options) on ``--n`` private texts and prints token F1, ROUGE-L and cosine at each stage (beam
search, correction, black-box search), the queries per target and five examples. With ``n`` = 8 the texts are
not those of the bench's 30 (the script prints how many are shared). The Secret (the true texts) is used for
scoring only. Save the trained decoder once (``save=DIR``) and reuse it (``load=DIR``) to compare options on the
same decoder.

    python benchmarks/decoder_probe.py --n 8 save=/tmp/gru search=15000 length_penalty=0.003 init=decoder
    python benchmarks/decoder_probe.py --n 8 load=/tmp/gru search=15000 length_penalty=0.003
"""

from __future__ import annotations

import argparse
import time

from leaklab.attacks.embedding.registry import EMBED_ATTACKS, Scenario, victim_targets
from leaklab.core import parse_pairs
from leaklab.embed_bench import FULL
from leaklab.experiments.runner import run_embedding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="private texts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("options", nargs="*", help="decoder options, key=value")
    args = ap.parse_args()
    base = {k: v for k, v in FULL["decoder"]["options"].items() if k not in ("search", "length_penalty")}
    opts = EMBED_ATTACKS.get("decoder").options({**base, **parse_pairs(args.options)})
    scn = Scenario(n=args.n, seed=args.seed)
    bench = Scenario(n=FULL["decoder"]["n"], seed=0)
    shared = set(victim_targets(scn)[0].texts) & set(victim_targets(bench)[0].texts)
    print(f"options {opts.changed()}; {len(shared)} of the {args.n} texts are among the bench's {bench.n}")
    t0 = time.perf_counter()
    rep = run_embedding("decoder", scn, opts)
    m = rep.aggregate
    keys = ("token_f1", "rougeL", "cosine")
    for stage, d in (("beam", m["base"]), ("corrected", m.get("corrected")), ("final", m)):
        if d is not None:
            print(f"{stage:>9}: " + ", ".join(f"{k} {d[k]:.3f}" for k in keys if k in d))
    print(f"queries per target {m['correction_queries_per_target']:.0f}; {time.perf_counter() - t0:.0f} s")
    for e in rep.pairs:
        print(f"   {e['true_text']!r} -> {e['pred_text']!r}")


if __name__ == "__main__":
    main()
