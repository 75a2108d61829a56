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

``--teacher``: no decoding; along every text's true prefix (the texts whose first ``--max-len`` + 1 tokens are
all in the token set) the pool decoder's shortlist is computed as the decoder does (span z, prior, output
filter with the true prefixes explained away) and the probe counts, per position, whether the true next token is
in the shortlist, first by the decoder's score, and first by the K-FAC own-terms cosine (``prefix_rescore``'s
evidence) or by the decoder's score + 1 × its standardised value.
"""

from __future__ import annotations

import time

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import (
    FullRankChecks,
    NextTokenEvidence,
    PrefixRerank,
    SompAttack,
    SompOptions,
    _loops,
    dedupe,
    robust_z,
    span_beam_decode,
    standardised,
)
from leaklab.core import parse_pairs


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def teacher_forced(spans, tokens: torch.Tensor, texts: list[list[int]], opts: SompOptions, positions: int) -> None:
    col = {int(t): j for j, t in enumerate(tokens.tolist())}
    rows = [t[: positions + 1] for t in texts if len(t) > positions and all(v in col for v in t[: positions + 1])]
    truth = torch.tensor(rows, device=spans.device)
    checks = FullRankChecks(spans, tokens, opts.rank_cut)
    evidence = NextTokenEvidence(spans, tokens, explain=opts.explain, whiten=opts.whiten)
    rerank = PrefixRerank(spans, opts)
    k = min(opts.shortlist, tokens.numel())
    every = torch.arange(len(rows), device=spans.device)
    print(f"teacher-forced: {len(rows)} of {len(texts)} texts have their first {positions + 1} tokens in the set")
    print(
        "| prefix length | cases | true token in shortlist | first: decoder | first: K-FAC | first: decoder + K-FAC z |"
    )
    print("|---|---|---|---|---|---|")
    total = torch.zeros(5)
    for p in range(1, positions + 1):
        seqs = truth[:, :p]
        z = robust_z(checks.cheap(seqs, opts.chunk).masked_fill(_loops(seqs, tokens), 0.0))
        logp, out_z = evidence.step(seqs)
        mixed = z + opts.lm_weight * logp + (opts.out_weight * out_z if out_z is not None else 0.0)
        short = torch.topk(mixed, k, dim=1).indices
        kfac = rerank.cosines(seqs, tokens, short, evidence.cache, every)
        true_col = torch.tensor([col[int(v)] for v in truth[:, p]], device=spans.device)
        where = short == true_col.unsqueeze(1)
        inside = where.any(1)
        score = mixed.gather(1, short)
        firsts = [(s.argmax(1) == where.float().argmax(1)) & inside for s in (score, kfac, score + standardised(kfac))]
        row = torch.tensor([len(rows), int(inside.sum()), *(int(f.sum()) for f in firsts)], dtype=torch.float)
        total += row
        print(f"| {p} | " + " | ".join(str(int(v)) for v in row) + " |", flush=True)
        evidence.select(every, true_col)
    print("| all | " + " | ".join(str(int(v)) for v in total) + " |")


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--max-len", type=int, default=40, help="positions decoded (and scored)")
    ap.add_argument("--budget", type=float, default=300.0, help="decoding time limit, seconds")
    ap.add_argument("--opt", action="append", default=[], help="a SOMP option, key=value (repeatable)")
    ap.add_argument("--teacher", action="store_true", help="teacher-forced shortlist counts, no decoding")
    args = ap.parse_args()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    opts = {"max_len": args.max_len, "budget_s": args.budget, **parse_pairs(args.opt)}
    attack = SompAttack(SompOptions.from_dict(opts, "somp"))
    tokens = attack.token_set(spans)
    if args.teacher:
        teacher_forced(spans, tokens, [list(t) for t in secret.token_ids], attack.opts, args.max_len)
        return
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
