"""TIGER-style continuous embedding search against the discrete span test, on one batch (issue 25 probe).

For one client update (optionally under a defense, undone where the structure allows by ``somp-adaptive``'s
known-noise projection) it reports: the discrete layer-1 span test's token recall/precision at ``--tau``; the
same distances used as a ranking (the true tokens among the nearest k); and the continuous search of
``leaklab.attacks.gradient.tiger`` over a pool of candidate tokens — token recall/precision of the decoded
texts, ROUGE-1/2 against the true texts, and per-position accuracy. The text lengths are GRANTED to the
search (a probe flag, recorded in the output); the pool comes from the update alone.

    python benchmarks/tiger_probe.py --regime short --batch-size 4 --seed 0 --defense gaussian:sigma=1e-4
    python benchmarks/tiger_probe.py --regime long --batch-size 16 --seed 100 --pool output:1152
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from probe_setup import probe_parser

from leaklab.attacks.gradient.adaptive import adapt
from leaklab.attacks.gradient.dager import Found, SpanModel
from leaklab.attacks.gradient.somp import SompOptions, dedupe, output_pool, select_by_omp, with_last_alternatives
from leaklab.attacks.gradient.tiger import (
    TigerOptions,
    ranked_decode,
    soft_layer_inputs,
    subspace_residual,
    tiger_search,
)
from leaklab.bench.gradient import REGIMES
from leaklab.defenses import defended_update, make_defense
from leaklab.metrics.text import match_texts, score_batch
from leaklab.models import ModelRef


def token_prf(found: set[int], true: set[int]) -> dict[str, float]:
    hit = len(found & true)
    return {
        "found": len(found),
        "hit": hit,
        "recall": hit / max(1, len(true)),
        "precision": hit / max(1, len(found)),
    }


def make_pool(spans: SpanModel, spec: str, dist1: torch.Tensor) -> torch.Tensor:
    """``span:K`` (the K nearest tokens at layer 1) or ``output:K`` (the K largest output-gradient rows)."""
    kind, _, k = spec.partition(":")
    size = int(k)
    if kind == "output":
        pool = output_pool(spans, size)
        if pool is not None:
            return pool.cpu()
    return torch.topk(dist1, size, largest=False).indices.cpu()


def position_accuracy(pred: list[list[int]], true: list[list[int]], pairs: list[tuple[int, int]]) -> float:
    """Share of true positions whose token the matched decoded text has at the same position."""
    hit = total = 0
    matched = {t: p for p, t in pairs}
    for ti, ids in enumerate(true):
        total += len(ids)
        p = pred[matched[ti]] if ti in matched else []
        hit += sum(1 for a, b in zip(p, ids, strict=False) if a == b)
    return hit / max(1, total)


def texts_summary(ids: list[list[int]], tok, secret, true_ids: list[list[int]], true: set[int]) -> dict:
    """Token recall/precision, ROUGE and per-position accuracy of decoded texts against the batch."""
    pred_texts = [tok.decode(t) for t in ids]
    agg = score_batch(pred_texts, list(secret.texts), ids, true_ids).aggregate()
    pairs = match_texts(pred_texts, list(secret.texts))
    return {
        "tokens": token_prf({t for row in ids for t in row}, true),
        "rouge1": agg["rouge1"],
        "rouge2": agg["rouge2"],
        "token_f1": agg["token_f1"],
        "position_accuracy": position_accuracy(ids, true_ids, pairs),
        "examples": [[secret.texts[t][:80], pred_texts[p][:80]] for p, t in pairs[:3]],
    }


def save(out: dict, path: str) -> None:
    """The summary so far (without the decoded ids), printed at the end and written after every stage."""
    text = json.dumps({k: v for k, v in out.items() if not k.endswith("_ids")}, indent=1, default=str)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")


@torch.no_grad()
def objective_gap(spans: SpanModel, true_ids: list[list[int]], pool: torch.Tensor, seed: int) -> dict:
    """The search objective (mean layer-1 / layer-2 residual over every position but each text's last, which
    the next-token gradient does not see) at the true texts, at the same texts with their tokens shuffled (the
    right bag, wrong positions) and at texts of random pool tokens: a continuous search can only place tokens
    where the truth scores below the shuffled control."""
    gen = torch.Generator().manual_seed(seed)
    shuffled = [[t[i] for i in torch.randperm(len(t), generator=gen).tolist()] for t in true_ids]
    random = [pool[torch.randint(pool.numel(), (len(t),), generator=gen)].tolist() for t in true_ids]
    width = max(len(t) for t in true_ids)
    mask = torch.zeros(len(true_ids), width, dtype=torch.long)
    for i, t in enumerate(true_ids):
        mask[i, : len(t) - 1] = 1  # the scored positions
    out = {}
    for name, texts in (("true", true_ids), ("shuffled", shuffled), ("random_pool", random)):
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t)
        full = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            full[i, : len(t)] = 1
        x1, x2 = soft_layer_inputs(
            spans.adapter, spans.adapter.embeddings(ids.to(spans.device)), full.long().to(spans.device)
        )
        keep = mask.bool().to(spans.device)
        out[name] = {
            "layer1": float(subspace_residual(x1.double()[keep], spans.sub1.basis).mean()),
            "layer2": float(subspace_residual(x2.double()[keep], spans.sub2.basis).mean()),
        }
    return out


def main() -> None:
    ap = probe_parser(__doc__, regime="short", batch_size=4, seed=0)
    ap.add_argument("--defense", default="", help="name:key=value, e.g. gaussian:sigma=1e-4")
    ap.add_argument("--tau", type=float, default=1e-3, help="the discrete span test's threshold")
    ap.add_argument("--pool", default="span:256", help="span:K or output:K")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--layer2-weight", type=float, default=1.0)
    ap.add_argument("--coverage-weight", type=float, default=1.0)
    ap.add_argument("--soft", action="store_true", help="soft mixtures forward (no straight-through argmax)")
    ap.add_argument("--entropy-weight", type=float, default=0.01)
    ap.add_argument("--init-scale", type=float, default=20.0)
    ap.add_argument("--init-boost", type=float, default=20.0)
    ap.add_argument("--ranked", action="store_true", help="also the threshold-free greedy decode, and TIGER from it")
    ap.add_argument("--no-repeats", action="store_true", help="ranked decode: never the previous token again")
    ap.add_argument("--skip-tiger", action="store_true", help="only the ranked decode (and --omp), no joint search")
    ap.add_argument("--gap-only", action="store_true", help="only the objective at the truth vs controls")
    ap.add_argument("--omp", action="store_true", help="SOMP's OMP stage over the decoded texts (last token re-chosen)")
    ap.add_argument("--out", default="", help="write the summary JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    regime = REGIMES[args.regime]
    defenses = []
    if args.defense:
        name, _, kv = args.defense.partition(":")
        key, _, value = kv.partition("=")
        defenses = [make_defense(name, **{key: float(value)})]
    ref = ModelRef(args.model)
    obs, secret = defended_update(
        "fedsgd", ref, regime.corpus, args.batch_size, args.seed, defenses, regime.min_tokens, regime.max_tokens
    )
    view, adapt_info = adapt(obs, 1.5, 60) if defenses else (obs, {})
    spans = SpanModel(view)
    tok = spans.loaded.tokenizer
    true_ids = [list(t) for t in secret.token_ids]
    true = {t for ids in true_ids for t in ids}
    dist1 = spans.layer1_distances(0).cpu()
    order = torch.argsort(dist1)
    out: dict = {
        "args": vars(args),
        "adapt": adapt_info,
        "tokens": sum(len(t) for t in true_ids),
        "distinct_true": len(true),
        "rank_l1": spans.sub1.rank,
        "rank_l2": spans.sub2.rank,
        "full_rank": spans.full_rank,
        "granted": {"lengths": list(secret.lengths), "batch_size": args.batch_size},
        "span_test": token_prf({int(i) for i in torch.nonzero(dist1 < args.tau).flatten()}, true),
        "span_ranking": {
            f"top{k}": token_prf({int(i) for i in order[:k]}, true) for k in (len(true), 2 * len(true), 256, 1152)
        },
    }
    pool = make_pool(spans, args.pool, dist1)
    out["pool"] = token_prf({int(i) for i in pool}, true)
    out["objective_gap"] = objective_gap(spans, true_ids, pool, args.seed)
    save(out, args.out)
    if args.gap_only:
        print(json.dumps(out, indent=1, default=str), flush=True)
        return
    opts = TigerOptions(
        steps=args.steps,
        lr=args.lr,
        layer2_weight=args.layer2_weight,
        coverage_weight=args.coverage_weight,
        straight_through=not args.soft,
        entropy_weight=args.entropy_weight,
        init_scale=args.init_scale,
        init_boost=args.init_boost,
    )
    lengths = list(secret.lengths)
    init = None
    if args.ranked:
        t1 = time.perf_counter()
        init = ranked_decode(spans, pool, lengths, repeats=not args.no_repeats)
        out["ranked"] = texts_summary(init, tok, secret, true_ids, true) | {"seconds": time.perf_counter() - t1}
        out["ranked_ids"] = init
        save(out, args.out)
    for name, start in (("tiger", None), ("tiger_from_ranked", init)):
        if args.skip_tiger or (name == "tiger_from_ranked" and start is None):
            continue
        t1 = time.perf_counter()
        res = tiger_search(
            spans.adapter, spans.sub1.basis, spans.sub2.basis, pool, dist1[pool], lengths, opts, args.seed, start
        )
        out[name] = texts_summary(res.ids, tok, secret, true_ids, true) | {
            "seconds": time.perf_counter() - t1,
            "loss_first_last": [res.loss_curve[0], res.loss_curve[-1]],
            "decoded_residual1_mean": float(torch.nanmean(res.residual1)),
            "decoded_residual2_mean": float(torch.nanmean(res.residual2)),
        }
        out[f"{name}_ids"] = res.ids
        save(out, args.out)
    if args.omp:
        t1 = time.perf_counter()
        texts = [ids for key in ("ranked_ids", "tiger_ids", "tiger_from_ranked_ids") for ids in out.get(key, [])]
        found = dedupe([Found(ids[:-1], 0.0, False) for ids in texts if len(ids) > 1])
        opts_somp = SompOptions()
        found = with_last_alternatives(spans, found, opts_somp.last_alternatives, opts_somp.max_atoms)
        chosen, omp_info = select_by_omp(spans, found, args.batch_size, opts_somp)
        out["omp"] = texts_summary([f.ids for f in chosen], tok, secret, true_ids, true) | {
            "seconds": time.perf_counter() - t1,
            "dictionary": omp_info.get("dictionary"),
            "omp_residual": omp_info.get("omp_residual"),
        }
    out["seconds"] = time.perf_counter() - t0
    save(out, args.out)
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_ids")}, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
