"""FET-style token counts: can the output-embedding gradient say how often each token occurs in the batch?

Row v of the (tied) output-embedding gradient is (1/N) Σ_t p_t(v) h_t − (1/N) Σ_{t: y_t = v} h_t (+ the
input-side part of a tied embedding). The lm_head inputs h_t share a strong common direction u, so after the
softmax background E[p(v) h] (:class:`leaklab.attacks.gradient.somp.NextTokenEvidence`, from the model's own
samples) is removed, s_v = −⟨g_v − E[p(v) h], u⟩ grows with the number of times v is a target. The count
estimate is s_v over the median s of the pool's top-n tokens (most batch tokens occur once), rounded. Prints,
against the Secret (scoring only), how often the estimate equals the true target count, per true count.

    python benchmarks/count_probe.py --regime short --batch-size 32 --seed 1
"""

from __future__ import annotations

from collections import Counter

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import NextTokenEvidence, SompAttack, lm_head_states, model_samples


def main() -> None:
    ap = probe_parser(__doc__, regime="short", batch_size=32, seed=1)
    args = ap.parse_args()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    tokens = SompAttack().token_set(spans)
    ev = NextTokenEvidence(spans, tokens)
    h, _ = lm_head_states(spans.loaded.model, model_samples(spans.loaded, 8, 64, 1))
    u = h.double().mean(0)
    u = u / u.norm()
    s = -((ev.rows - ev.background()) @ u)
    counts = Counter(t for text in secret.token_ids for t in text[1:])  # target occurrences
    n = len(counts)
    top = torch.topk(s, min(n, s.numel())).values
    unit = float(top.median())
    est = (s / unit).round().clamp_min(0).long()
    truth = torch.tensor([counts.get(int(t), 0) for t in tokens.tolist()])
    print(f"{args.regime} B={args.batch_size} seed {args.seed}: {n} distinct targets, pool {tokens.numel()}")
    for c in sorted(set(truth.tolist()))[:6]:
        sel = truth == c
        hist = Counter(est[sel].tolist())
        print(
            f"  true count {c}: {int(sel.sum())} tokens, estimate exact {float((est[sel] == c).float().mean()):.2f}"
            f", estimates {dict(sorted(hist.items())[:8])}"
        )
    corr = torch.corrcoef(torch.stack([s, truth.double()]))[0, 1]
    print(f"correlation of s_v with the true count: {float(corr):.3f}")


if __name__ == "__main__":
    main()
