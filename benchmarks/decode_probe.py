"""SOMP's full-rank decoder alone (stage 2), scored against the private texts: how far decoding stays right.

Runs :func:`leaklab.attacks.gradient.somp.span_beam_decode` on one client update exactly as SOMP does (same
token set, same options; ``--opt key=value`` overrides one) and prints, per private text, the longest prefix
that some candidate gets right and the best candidate's bag-of-tokens recall over the first ``--max-len``
tokens. The Secret is used for scoring only.

    python benchmarks/decode_probe.py --regime long --batch-size 16 --seed 100 --max-len 110 --budget 600
    python benchmarks/decode_probe.py --regime long --batch-size 16 --seed 100 --max-len 110 --budget 600 \\
        --opt explain=false
    python benchmarks/decode_probe.py --regime long --batch-size 16 --seed 0 --max-len 16 --budget 600 \
        --opt prefix_rescore=1000 --opt prefix_first=16
"""

from __future__ import annotations

import time

from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import SompAttack, SompOptions, dedupe, span_beam_decode
from leaklab.core import parse_pairs


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--max-len", type=int, default=40, help="positions decoded (and scored)")
    ap.add_argument("--budget", type=float, default=300.0, help="decoding time limit, seconds")
    ap.add_argument("--opt", action="append", default=[], help="a SOMP option, key=value (repeatable)")
    args = ap.parse_args()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    opts = {"max_len": args.max_len, "budget_s": args.budget, **parse_pairs(args.opt)}
    attack = SompAttack(SompOptions.from_dict(opts, "somp"))
    tokens = attack.token_set(spans)
    start = time.perf_counter()
    stats: dict = {}
    found = dedupe(span_beam_decode(spans, tokens, args.batch_size, attack.opts, prior=not spans.l1_exact, stats=stats))
    seconds = time.perf_counter() - start
    print(
        f"{args.regime} B={args.batch_size} seed {args.seed}: T={sum(secret.lengths)}, layer-1 exact "
        f"{spans.l1_exact}, token set {tokens.numel()}; {len(found)} candidates in {seconds:.0f} s {stats}"
    )
    prefixes, recalls = [], []
    for text in secret.token_ids:
        ids = list(text)[: args.max_len]
        prefixes.append(max(common_prefix(f.ids, ids) for f in found))
        recalls.append(max(len(set(f.ids) & set(ids)) for f in found) / len(set(ids)))
    print(f"longest correct prefix per text: {prefixes}, mean {sum(prefixes) / len(prefixes):.2f}")
    print(
        f"best bag-of-tokens recall per text: {[round(r, 2) for r in recalls]}, mean {sum(recalls) / len(recalls):.3f}"
    )


if __name__ == "__main__":
    main()
