"""Teacher-forced probe of explaining away in SOMP's output-gradient filter (full-rank regime, T > d).

SOMP decodes every text in lockstep; by position s the positions before s are decoded. Their exact terms
(p_t − e_{y_t}) h_t / N can be subtracted from the output-embedding gradient's rows before the matched
filter looks for the next token (:meth:`leaklab.attacks.gradient.somp.NextTokenEvidence.expected`). Here every
text is fed its true prefix (the decoder's best case) and, per position bucket, the share of positions where the
true next token ranks first among SOMP's token pool is printed for:

* current: −cos(g_v − E[p(v) h], h) with the background pooled from model samples and every batch position;
* explain (1/N known): the decoded positions' terms subtracted with the true 1/N, the pooled background
  scaled to the positions left (an upper bound: the attacker does not observe N);
* explain (α fitted): as SOMP does it, α = 1/N fitted by least squares of the rows on the decoded terms;
* explain (α fitted), whitened: the same cosine in the whitened metric of the lm_head inputs (SOMP's
  ``whiten`` option, default 1e-3);

each with + 0.1 log p_model (SOMP's mix). The Secret is used to feed the true prefixes and to score only.

    python benchmarks/explain_probe.py --regime long --batch-size 16 --seed 100
    python benchmarks/explain_probe.py --regime short --batch-size 64 --seed 100
"""

from __future__ import annotations

from collections import defaultdict

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import NextTokenEvidence, SompAttack, SompOptions, robust_z

BUCKETS = ((0, 10), (10, 30), (30, 60), (60, 10_000))


def main() -> None:
    args = probe_parser(__doc__).parse_args()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    model = spans.loaded.model
    head = model.get_output_embeddings()
    tokens = SompAttack().token_set(spans)
    col = {int(t): j for j, t in enumerate(tokens.tolist())}
    ev = NextTokenEvidence(spans, tokens, whiten=SompOptions().whiten)
    white = ev.white
    rows = ev.rows
    texts = []
    for ids in secret.token_ids:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, a, out=captured: out.append(a[0][0].detach()))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        hook.remove()
        h = captured[0][:-1].double()
        probs = torch.softmax(logits, -1)[:, tokens]
        y = torch.tensor([col.get(t, -1) for t in ids[1:]])
        texts.append((h, probs, y, torch.log_softmax(logits[:, tokens], -1)))
    n_total = sum(h.shape[0] for h, *_ in texts)
    pooled = (ev.bg_sum + sum(p.T @ h for h, p, _, _ in texts)) / (ev.bg_count + n_total)
    hits: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    decoded, n_dec = torch.zeros_like(rows), 0

    def z_of(expected: torch.Tensor, x: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
        resid = rows - expected
        if metric is not None:
            resid, x = resid @ metric, x @ metric
        resid = resid / resid.norm(dim=1, keepdim=True)
        return robust_z((x @ resid.T) / x.norm())

    for s in range(max(h.shape[0] for h, *_ in texts)):
        alpha = float((rows * decoded).sum() / (decoded * decoded).sum()) if n_dec else 0.0
        fitted = alpha * decoded + max(0.0, 1 - alpha * n_dec) * pooled if alpha > 0 else pooled
        variants = {
            "current": (pooled, None),
            "explain (1/N known)": ((decoded + (n_total - n_dec) * pooled) / n_total, None),
            "explain (α fitted)": (fitted, None),
            "explain (α fitted), whitened": (fitted, white),
        }
        for h, _, y, lp in texts:
            if s >= h.shape[0] or y[s] < 0:
                continue
            for name, (expected, metric) in variants.items():
                z = z_of(expected, h[s : s + 1], metric)
                hits[name].append((s, int(z.argmax()) == int(y[s])))
                hits[name + " + 0.1 log p"].append((s, int((z + 0.1 * lp[s : s + 1]).argmax()) == int(y[s])))
        for h, probs, y, _ in texts:  # every text's position s is now decoded
            if s < h.shape[0]:
                decoded += probs[s].view(-1, 1) * h[s].view(1, -1)
                if y[s] >= 0:
                    decoded[y[s]] -= h[s]
                n_dec += 1
    print(f"{args.regime} B={args.batch_size} seed {args.seed}: N={n_total} predicted positions, pool {len(col)}")
    print(
        "share of positions where the true next token ranks first; all | " + " | ".join(f"{a}-{b}" for a, b in BUCKETS)
    )
    for name, vals in hits.items():
        pos = torch.tensor([p for p, _ in vals])
        ok = torch.tensor([o for _, o in vals], dtype=torch.float)
        parts = [f"{float(ok[(pos >= a) & (pos < b)].mean()):.3f}" for a, b in BUCKETS]
        print(f"  {name:44s} {float(ok.mean()):.3f} | " + " | ".join(parts))


if __name__ == "__main__":
    main()
