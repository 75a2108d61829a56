"""Teacher-forced probe of SOMP's full-rank checks: where does the true next token rank among the token set?

For the first ``--texts`` private texts of one FedSGD batch, every true prefix is extended by every token of
SOMP's token set and scored by the cheap check (layer-1 MLP input) and, on the shortlist, both checks; the
script prints the share of positions where the true token comes first and its median rank. The Secret is
used here for scoring only (this is an analysis of the attack, not the attack).

    python benchmarks/fullrank_probe.py --batch-size 32 --seed 100
    python benchmarks/fullrank_probe.py --batch-size 16 --seed 100 --regime long --texts 4
"""

from __future__ import annotations

import argparse

import torch

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import FullRankChecks, SompAttack, robust_z
from leaklab.bench.gradient import REGIMES
from leaklab.models.registry import ModelRef
from leaklab.threat.fedsgd import client_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--regime", default="short", choices=["short", "long"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--texts", type=int, default=6)
    ap.add_argument("--max-positions", type=int, default=40)
    args = ap.parse_args()
    regime = REGIMES[args.regime]
    obs, secret = client_update(
        ModelRef(args.model), regime.corpus, args.batch_size, args.seed, regime.min_tokens, regime.max_tokens
    )
    spans = SpanModel(obs)
    attack = SompAttack()
    tokens = attack.token_set(spans)
    checks = FullRankChecks(spans, tokens, attack.opts.rank_cut)
    k = attack.opts.shortlist
    model = spans.loaded.model
    lambdas = (0.5, 1.0, 2.0, 4.0, 8.0)
    cheap_rank, first_both, lm_rank = [], [], []
    mixed_rank: dict[float, list[int]] = {lam: [] for lam in lambdas}
    for ids in secret.token_ids[: args.texts]:
        t = torch.tensor(ids)
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
    for name, got in [("LM prior", lm_rank)] + [(f"robust z + {lam} log p", mixed_rank[lam]) for lam in lambdas]:
        r = torch.tensor(got, dtype=torch.float)
        print(
            f"{name}: true token first {float((r == 0).float().mean()):.3f}, in top 5 "
            f"{float((r < 5).float().mean()):.3f}, median rank {r.median():.0f}"
        )


if __name__ == "__main__":
    main()
