"""Teacher-forced probe of the output-embedding gradient in the full-rank regime (T > d).

1. Token pool: recall of the batch's distinct tokens among the largest rows of ∂L/∂W_out, and the knee that
   SOMP uses to size its pool (:func:`leaklab.attacks.gradient.somp.norm_knee`).
2. Next-token evidence (:class:`leaklab.attacks.gradient.somp.NextTokenEvidence`): for every true prefix of
   every text, where the true next token ranks among the pool under the matched filter −cos(g_v, h − h̄),
   the model prior log p(v | prefix), and their mix (h̄ here: the mean over all the batch's positions, a
   teacher-forced stand-in for the decoder's running mean over its own prefixes). The Secret is used for
   scoring only.

    python benchmarks/output_probe.py --regime long --batch-size 16 --seed 100
    python benchmarks/output_probe.py --regime short --batch-size 128 --seed 100
"""

from __future__ import annotations

import argparse

import torch

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import SompAttack, norm_knee, robust_z
from leaklab.bench.gradient import REGIMES
from leaklab.models.registry import ModelRef
from leaklab.threat.fedsgd import client_update


def ranks(score: torch.Tensor, truth: torch.Tensor) -> str:
    r = (score > score.gather(1, truth.view(-1, 1))).sum(1).float()
    first, top5 = float((r == 0).float().mean()), float((r < 5).float().mean())
    return f"first {first:.3f}, top 5 {top5:.3f}, median {r.median():.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--regime", default="long", choices=["short", "long"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    regime = REGIMES[args.regime]
    obs, secret = client_update(
        ModelRef(args.model), regime.corpus, args.batch_size, args.seed, regime.min_tokens, regime.max_tokens
    )
    spans = SpanModel(obs)
    model = spans.loaded.model
    head = model.get_output_embeddings()
    name = next(n for n, p in model.named_parameters() if p is head.weight)
    grad = obs.gradients[name].double()
    norms = grad.norm(dim=1)
    order = torch.argsort(norms, descending=True)
    distinct = {t for ids in secret.token_ids for t in ids}
    total = sum(len(ids) for ids in secret.token_ids)
    d = spans.adapter.hidden_size
    print(f"{args.regime} B={args.batch_size} seed {args.seed}: T={total}, distinct tokens {len(distinct)}, d={d}")
    for k in (d, 2 * d, 3 * d, 4 * d):
        top = set(order[:k].tolist())
        weighted = sum(t in top for ids in secret.token_ids for t in ids) / total
        print(
            f"  top {k} rows: distinct recall {len(top & distinct) / len(distinct):.3f}, token-weighted {weighted:.3f}"
        )
    knee = norm_knee(norms, d // 2, 8 * d)
    tokens = SompAttack().token_set(spans)
    print(f"  knee of the sorted row norms: {knee}; SOMP's pool: {tokens.numel()} tokens")

    col = {int(t): j for j, t in enumerate(tokens.tolist())}
    unit = grad[tokens] / grad[tokens].norm(dim=1, keepdim=True)
    hs, truth, logp = [], [], []
    for ids in secret.token_ids:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, a, out=captured: out.append(a[0][0].detach()))
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        hook.remove()
        for p in range(1, len(ids) - 1):  # position p's token, predicted from the prefix ids[:p]
            if ids[p] in col:
                hs.append(captured[0][p - 1].double())
                truth.append(col[ids[p]])
                logp.append(torch.log_softmax(out.logits[0, p - 1].double()[tokens], dim=0))
    h, y, lp = torch.stack(hs), torch.tensor(truth), torch.stack(logp)
    hc = h - h.mean(0)
    z = robust_z((hc @ unit.T) / hc.norm(dim=1, keepdim=True))
    print(f"  next-token ranks over {len(y)} positions (true token in the pool):")
    print(f"    filter −cos(g, h − h̄):     {ranks(z, y)}")
    print(f"    model prior log p:          {ranks(lp, y)}")
    for a in (0.5, 1.0):
        print(f"    filter z + {a} log p:        {ranks(z + a * lp, y)}")


if __name__ == "__main__":
    main()
