"""Teacher-forced probe of SOMP's full-rank checks: where does the true next token rank among the token set?

For the first ``--texts`` private texts of one FedSGD batch, every true prefix is extended by every token of
SOMP's token set and scored by the cheap check (layer-1 MLP input) and, on the shortlist, both checks; the
script prints the share of positions where the true token comes first and its median rank. The Secret is
used here for scoring only (this is an analysis of the attack, not the attack).

    python benchmarks/fullrank_probe.py --batch-size 32 --seed 100
    python benchmarks/fullrank_probe.py --batch-size 16 --seed 100 --regime long --texts 4
"""

from __future__ import annotations

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import FullRankChecks, SompAttack, robust_z
from leaklab.bench.gradient import REGIMES


def main() -> None:
    ap = probe_parser(__doc__, regime="short", batch_size=32)
    ap.add_argument("--texts", type=int, default=6)
    ap.add_argument("--max-positions", type=int, default=40)
    args = ap.parse_args()
    regime = REGIMES[args.regime]
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    attack = SompAttack()
    tokens = attack.token_set(spans)
    checks = FullRankChecks(spans, tokens, attack.opts.rank_cut)
    k = attack.opts.shortlist
    model = spans.loaded.model
    lambdas = (0.5, 1.0, 2.0, 4.0, 8.0)
    head = model.get_output_embeddings()
    gname = next(n for n, prm in model.named_parameters() if prm is head.weight)
    grows = obs.gradients[gname].double()[tokens]  # (pool, d): the output-embedding gradient's pool rows
    from leaklab.corpora import load_corpus, sample_texts

    public = sample_texts(load_corpus(regime.corpus), spans.loaded.tokenizer, 32, 0, 8, 64, split="public").texts
    pub_h: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, a: pub_h.append(a[0][0].detach()))
    with torch.no_grad():
        for text in public:  # the attacker's public reference: mean lm_head input over public text
            model(torch.tensor([spans.loaded.encode(text)]))
    hook.remove()
    h_ref = torch.cat(pub_h).double().mean(0)
    unit_g = grows / grows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out_variants = ("-<g,h>", "-<g,h-mean>", "-cos(g,h-mean)", "-cos(g,h-public mean)")
    out_rank: dict[str, list[int]] = {v: [] for v in out_variants}
    outmix_rank: dict[str, list[int]] = {}
    cheap_rank, first_both, lm_rank = [], [], []
    mixed_rank: dict[float, list[int]] = {lam: [] for lam in lambdas}
    for ids in secret.token_ids[: args.texts]:
        t = torch.tensor(ids)
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, a, out=captured: out.append(a[0].detach()))
        with torch.no_grad():
            model(t.view(1, -1))
        hook.remove()
        hs = captured[0][0].double()  # (len, d): lm_head inputs at every position
        for p in range(1, min(len(ids) - 1, args.max_positions)):
            hit = torch.nonzero(tokens == ids[p]).flatten()
            if hit.numel() == 0:
                continue
            cheap = checks.cheap(t[:p].view(1, -1), attack.opts.chunk)[0]
            cheap_rank.append(int((cheap < cheap[hit[0]]).sum()))
            short = torch.topk(cheap, k, largest=False).indices
            both = checks.full(t[:p].view(1, -1), torch.zeros(k, dtype=torch.long), tokens[short], attack.opts.chunk)
            first_both.append(int(tokens[short[both.argmin()]]) == ids[p])
            with torch.no_grad():  # the model's own next-token prior, restricted to the token set
                logp = torch.log_softmax(model(t[:p].view(1, -1)).logits[0, -1].double()[tokens], dim=0)
            lm_rank.append(int((logp > logp[hit[0]]).sum()))
            z = robust_z(cheap.view(1, -1))[0].double()
            h = hs[p - 1]
            hc = h - hs[:p].mean(0)
            outs = {
                "-<g,h>": -(grows @ h),
                "-<g,h-mean>": -(grows @ hc),
                "-cos(g,h-mean)": -(grows @ hc) / (grows.norm(dim=1) * hc.norm() + 1e-30),
                "-cos(g,h-public mean)": -(unit_g @ (h - h_ref)) / ((h - h_ref).norm() + 1e-30),
            }
            for name, sc in outs.items():
                out_rank[name].append(int((sc > sc[hit[0]]).sum()))
            oz = robust_z(-outs["-cos(g,h-public mean)"].view(1, -1))[0].double()  # robust_z ranks low values high
            mixes = {"cos z": oz}
            for a in (0.25, 0.5, 1.0, 2.0):
                mixes[f"{a} cos z + z"] = a * oz + z
                mixes[f"{a} cos z + 0.5 log p"] = a * oz + 0.5 * logp
                mixes[f"{a} cos z + z + 0.5 log p"] = a * oz + z + 0.5 * logp
            for label, mix in mixes.items():
                outmix_rank.setdefault(label, []).append(int((mix > mix[hit[0]]).sum()))
            for lam in lambdas:
                mix = z + lam * logp
                mixed_rank[lam].append(int((mix > mix[hit[0]]).sum()))
    ranks = torch.tensor(cheap_rank, dtype=torch.float)
    total = sum(len(i) for i in secret.token_ids)
    print(
        f"B={args.batch_size} {args.regime} seed {args.seed}: T={total}, token set {tokens.numel()} "
        f"(layer-1 exact: {spans.l1_exact}), {len(cheap_rank)} positions"
    )
    print(f"cheap check: true token first {float((ranks == 0).float().mean()):.3f}, median rank {ranks.median():.0f}")
    print(f"both checks on the shortlist: true token first {sum(first_both) / max(len(first_both), 1):.3f}")
    rows = [("LM prior", lm_rank)] + [(f"robust z + {lam} log p", mixed_rank[lam]) for lam in lambdas]
    rows += [(f"output gradient {v}", out_rank[v]) for v in out_variants] + list(outmix_rank.items())
    for name, got in rows:
        r = torch.tensor(got, dtype=torch.float)
        print(
            f"{name}: true token first {float((r == 0).float().mean()):.3f}, in top 5 "
            f"{float((r < 5).float().mean()):.3f}, median rank {r.median():.0f}"
        )


if __name__ == "__main__":
    main()
