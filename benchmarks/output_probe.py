"""Teacher-forced probe of the output-embedding gradient in the full-rank regime (T > d).

1. Token pool: recall of the batch's distinct tokens among the largest rows of ∂L/∂W_out, and the knee that
   SOMP uses to size its pool (:func:`leaklab.attacks.gradient.somp.norm_knee`).
2. Next-token evidence (:class:`leaklab.attacks.gradient.somp.NextTokenEvidence`): for every true prefix of
   every text, where the true next token ranks among the pool under the matched filter −cos(g_v − E[p(v) h], h)
   with the softmax background E[p(v) h] estimated from the model's own samples only (what the decoder has at
   its first step) and from those pooled with all the batch's positions (a teacher-forced stand-in for the
   decoder's running pool of its own prefixes), under session 4's filter −cos(g_v, h − h̄), the model prior
   log p(v | prefix), and their mixes. The Secret is used for scoring only.

    python benchmarks/output_probe.py --regime long --batch-size 16 --seed 100
    python benchmarks/output_probe.py --regime short --batch-size 128 --seed 100
"""

from __future__ import annotations

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import NextTokenEvidence, SompAttack, norm_knee, robust_z


def ranks(score: torch.Tensor, truth: torch.Tensor) -> str:
    r = (score > score.gather(1, truth.view(-1, 1))).sum(1).float()
    first, top5 = float((r == 0).float().mean()), float((r < 5).float().mean())
    return f"first {first:.3f}, top 5 {top5:.3f}, median {r.median():.0f}"


def main() -> None:
    args = probe_parser(__doc__).parse_args()
    obs, secret = probe_update(args)
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
    evidence = NextTokenEvidence(spans, tokens)  # its background: the model's own samples
    model_bg = evidence.background()
    hs, truth, logp = [], [], []
    batch_bg, batch_n = torch.zeros_like(model_bg), 0
    for ids in secret.token_ids:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, a, out=captured: out.append(a[0][0].detach()))
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        hook.remove()
        h_all, logits = captured[0].double()[:-1], out.logits[0, :-1].double()
        batch_bg += torch.softmax(logits, dim=-1)[:, tokens].T @ h_all
        batch_n += h_all.shape[0]
        for p in range(1, len(ids) - 1):  # position p's token, predicted from the prefix ids[:p]
            if ids[p] in col:
                hs.append(h_all[p - 1])
                truth.append(col[ids[p]])
                logp.append(torch.log_softmax(logits[p - 1][tokens], dim=0))
    h, y, lp = torch.stack(hs), torch.tensor(truth), torch.stack(logp)
    rows = grad[tokens]
    pooled_bg = (evidence.bg_sum + batch_bg) / (evidence.bg_count + batch_n)

    def filt(resid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        unit = resid / resid.norm(dim=1, keepdim=True)
        return robust_z((x @ unit.T) / x.norm(dim=1, keepdim=True))

    filters = {
        "−cos(g − E[p h], h), model samples": filt(rows - model_bg, h),
        "−cos(g − E[p h], h), samples + batch": filt(rows - pooled_bg, h),
        "session 4: −cos(g, h − h̄)": filt(rows, h - h.mean(0)),
    }
    print(f"  next-token ranks over {len(y)} positions (true token in the pool):")
    print(f"    model prior log p: {ranks(lp, y)}")
    for name, z in filters.items():
        print(f"    {name}: {ranks(z, y)}")
        for a in (0.1, 0.2, 0.5):
            print(f"      + {a} log p: {ranks(z + a * lp, y)}")


if __name__ == "__main__":
    main()
