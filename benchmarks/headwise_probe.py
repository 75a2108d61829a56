"""How well does each full-rank token-pool ranking find the batch's tokens? (SOMP option ``pool``.)

For one FedSGD batch, every vocabulary token is ranked by the output-embedding gradient's row norm (``output``,
the default), the layer-1 stacked span distance (``span``), and the head-wise subspace scores (``headwise``,
:func:`leaklab.attacks.gradient.subspace.headwise_scores`, whitened and plain). The script prints the share of
the batch's distinct tokens found in the top n, 1.5 n, 2 n and 2 d of each ranking (n: distinct tokens,
d: hidden size; SOMP's pool is at least 2 d). The Secret is used for scoring only.

    python benchmarks/headwise_probe.py --regime short --batch-size 64 --seed 100
"""

from __future__ import annotations

import time

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel, output_gradient
from leaklab.attacks.gradient.subspace import candidate_inputs, headwise_scores


def main() -> None:
    args = probe_parser(__doc__, regime="short", batch_size=64).parse_args()
    t0 = time.perf_counter()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    ad = spans.adapter
    true = torch.tensor(sorted({t for ids in secret.token_ids for t in ids}))
    n, d = true.numel(), ad.hidden_size
    inputs = candidate_inputs(ad, spans.vocab, 0)
    rankings = {
        "headwise (whitened, max over heads)": headwise_scores(obs, ad, inputs),
        "headwise (plain, max over heads)": headwise_scores(obs, ad, inputs, whiten=False),
        "span (layer-1 stacked distance)": -spans.layer1_distances(0),
    }
    grad = output_gradient(spans)
    if grad is not None:
        rankings["output (gradient row norm)"] = grad.norm(dim=1)
    total = sum(len(i) for i in secret.token_ids)
    print(
        f"{args.regime} B={args.batch_size} seed {args.seed}: T={total} tokens, {n} distinct, d={d} "
        f"(layer-1 exact: {spans.l1_exact}); {time.perf_counter() - t0:.0f} s"
    )
    for name, score in rankings.items():
        got = []
        for k in (n, int(1.5 * n), 2 * n, 2 * d):
            top = torch.topk(score, min(k, score.numel())).indices
            got.append(f"{float(torch.isin(true, top).float().mean()):.3f}")
        print(f"  {name:38s} recall in top n / 1.5n / 2n / 2d: {' / '.join(got)}")


if __name__ == "__main__":
    main()
