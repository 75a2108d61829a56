"""Residual-verified beams: does the OMP residual of the whole observed gradient tell a right continuation or
edit of a chosen text from a wrong one? (analysis.md, "Session 17: residual-verified beams").

Stage 1 runs SOMP's pipeline on one client update (decode, last-token alternatives, OMP) and caches the
candidates and OMP's chosen texts under ``--cache``; stage 2 (``--refine``) loads them and prints, per chosen
text, how it relates to the closest private text (the Secret is used for scoring only), then runs the
residual-verified refinement of :mod:`leaklab.attacks.gradient.refine` and scores before/after.

    python benchmarks/residual_probe.py --regime short --batch-size 32 --seed 1 --budget 300
    python benchmarks/residual_probe.py --regime short --batch-size 32 --seed 1 --teacher --lookahead 4
    python benchmarks/residual_probe.py --regime short --batch-size 32 --seed 1 --refine \\
        --opt refine_rounds=8 --opt refine_budget_s=900

``--teacher`` ranks the true next token among the edit shortlist by the residual, per chosen text, from the
text's right part (``--metric kfac``: in the K-FAC metric; ``--lookahead L``: each candidate continued by
L − 1 greedy tokens).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import (
    DagerOptions,
    SpanModel,
    assemble,
    best_effort_decoder,
    complete_last_tokens,
)
from leaklab.attacks.gradient.dictionary import observed_vector, sentence_gradients, signal_params, sketch_index
from leaklab.attacks.gradient.refine import KfacAtoms, replacement_residuals
from leaklab.attacks.gradient.somp import (
    SompAttack,
    SompOptions,
    TextEdits,
    dedupe,
    residual_refine,
    select_by_omp,
    span_beam_decode,
    with_last_alternatives,
)
from leaklab.core import parse_pairs
from leaklab.metrics.text import score_batch


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def decode_stage(spans: SpanModel, attack: SompAttack, n_texts: int) -> tuple[list, list, dict]:
    opts = attack.opts
    tokens = attack.token_set(spans)
    found = dedupe(span_beam_decode(spans, tokens, n_texts, opts, prior=not spans.l1_exact))
    dopts = DagerOptions(tau1=opts.tau1, tau2=opts.tau2, max_len=opts.max_len, chunk=opts.chunk, budget_s=opts.budget_s)
    extra = assemble(best_effort_decoder(spans, n_texts, dopts), None) if opts.best_effort_atoms else []
    complete_last_tokens(spans, extra)
    room = max(0, opts.max_atoms - len(extra))
    found = with_last_alternatives(spans, found[:room], opts.last_alternatives, room)
    seen = {tuple(f.ids) for f in extra}
    found = [f for f in found if tuple(f.ids) not in seen][:room] + extra
    chosen, info = select_by_omp(spans, found, n_texts, opts)
    chosen, info = attack.rechoose_last_tokens(spans, chosen, info)
    return found, chosen, info


def describe(chosen: list[list[int]], truth: list[list[int]], tok) -> None:
    for c in chosen:
        best = max(truth, key=lambda t: (common_prefix(c, t), -abs(len(t) - len(c))))
        k = common_prefix(c, best)
        kind = "EXACT" if c == best else ("trunc" if k == len(c) else f"diverges@{k}")
        print(f"  {kind:12s} len {len(c):2d}/{len(best):2d}  {tok.decode(c)!r}")


def print_score(label: str, chosen: list[list[int]], truth: list[list[int]], tok) -> None:
    sc = score_batch([tok.decode(c) for c in chosen], [tok.decode(t) for t in truth], chosen, truth)
    print(f"{label}: ROUGE-1 {sc.rouge1:.3f} ROUGE-2 {sc.rouge2:.3f} exact {sc.exact_rate:.3f}")


def residual_space(spans: SpanModel, metric: str, layers: str):
    """(gradients of texts, target) on the OMP dictionary's sketch (``metric`` euclid) or whitened in the K-FAC
    metric over every coordinate of the attention projections of ``layers`` (e.g. "0,1")."""
    if metric == "kfac":
        params = signal_params(spans.loaded, tuple(int(x) for x in layers.split(",")))
        space = KfacAtoms(spans.loaded, params)
        return space, space.whiten({p: spans.obs.gradients[p] for p in params})
    index = sketch_index(spans.obs, signal_params(spans.loaded))

    def gradients(batch: list[list[int]]) -> torch.Tensor:
        return sentence_gradients(spans.loaded, batch, None, index, head_means=spans.head_means)

    return gradients, observed_vector(spans.obs, index, spans.device)


def teacher_forced(
    spans: SpanModel,
    attack: SompAttack,
    chosen: list[list[int]],
    truth: list[list[int]],
    metric: str,
    layers: str,
    lookahead: int = 1,
) -> None:
    """Per chosen text, its correct part (up to where it leaves the closest private text) stands in its slot,
    the other slots as OMP chose them: is the true next token, among the edit shortlist, the one whose
    extension lowers the residual most? Also: the true text cut back (slot's text = correct part) vs the text
    as chosen (does cutting the wrong tail lower the residual). With ``lookahead`` L > 1 every candidate token is
    followed by L − 1 tokens of greedy span-check decoding (the true token too), and the first token is judged."""
    gradients, target = residual_space(spans, metric, layers)
    edits = TextEdits(spans, attack.token_set(spans), attack.opts)
    atoms = gradients(chosen)
    firsts, listed, cut_better, cases = 0, 0, 0, 0
    start = time.perf_counter()
    for slot, c in enumerate(chosen):
        best = max(truth, key=lambda t: (common_prefix(c, t), -abs(len(t) - len(c))))
        k = common_prefix(c, best)
        if k < 2 or k >= len(best):
            continue
        base = best[:k]
        short = edits.next_tokens(base)
        cands = [edits.greedy(base + [v], lookahead - 1) for v in dict.fromkeys([best[k], *short])]
        res = replacement_residuals(atoms, target, slot, gradients([c, base, *cands]))
        cases += 1
        listed += best[k] in short
        firsts += int(res[2:].argmin()) == 0
        cut_better += float(res[1]) < float(res[0])
        rank = int((res[2:] < res[2]).sum())
        print(
            f"  slot {slot:2d} k {k:2d}: chosen {res[0]:.4f} cut {res[1]:.4f} true {res[2]:.4f} rank {rank} "
            f"of {len(cands)} (in shortlist {best[k] in short}) best other {res[3:].min():.4f}"
        )
    print(
        f"teacher-forced over {cases} slots: true next first {firsts}, in shortlist {listed}, "
        f"cut lowers residual {cut_better}; {time.perf_counter() - start:.0f} s"
    )


def main() -> None:
    ap = probe_parser(__doc__, regime="short", batch_size=32, seed=1)
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--cache", default="/tmp/residual_probe")
    ap.add_argument("--refine", action="store_true")
    ap.add_argument("--teacher", action="store_true", help="teacher-forced: rank of the true next token")
    ap.add_argument("--metric", default="euclid", choices=["euclid", "kfac"])
    ap.add_argument("--lookahead", type=int, default=1, help="teacher: tokens per candidate (greedy after the 1st)")
    ap.add_argument("--layers", default="0,1", help="kfac: attention layers whose projections are compared")
    ap.add_argument("--opt", action="append", default=[], help="a SOMP option, key=value (repeatable)")
    args = ap.parse_args()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    opts = {"budget_s": args.budget, "refine_rounds": 12, **parse_pairs(args.opt)}
    attack = SompAttack(SompOptions.from_dict(opts, "somp"))
    path = Path(args.cache) / f"{args.regime}-B{args.batch_size}-s{args.seed}.pkl"
    truth = [list(t) for t in secret.token_ids]
    tok = spans.loaded.tokenizer
    if not path.exists():
        start = time.perf_counter()
        found, chosen, info = decode_stage(spans, attack, args.batch_size)
        secs = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps({"found": found, "chosen": chosen, "info": info, "seconds": secs}))
    state = pickle.loads(path.read_bytes())
    chosen = [f.ids for f in state["chosen"]]
    print(
        f"T={sum(secret.lengths)} candidates {len(state['found'])} decode+omp {state['seconds']:.0f} s, "
        f"residual {state['info']['omp_residual']:.3f}"
    )
    describe(chosen, truth, tok)
    print_score("SOMP", chosen, truth, tok)
    in_dict = sum(any(f.ids == t for f in state["found"]) for t in truth)
    print(f"true texts in the dictionary: {in_dict}/{len(truth)}")
    if args.teacher:
        teacher_forced(spans, attack, chosen, truth, args.metric, args.layers, args.lookahead)
    if not args.refine:
        return
    tokens = attack.token_set(spans)
    start = time.perf_counter()
    texts, history = residual_refine(spans, tokens, chosen, attack.opts)
    secs = time.perf_counter() - start
    print(f"refined in {secs:.0f} s; residual per round: {' '.join(f'{h:.4f}' for h in history)}")
    describe(texts, truth, tok)
    print_score("SOMP + residual-verified edits", texts, truth, tok)


if __name__ == "__main__":
    main()
