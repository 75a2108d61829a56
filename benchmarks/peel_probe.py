"""Peeling probe: are the texts SOMP's OMP chooses at B = 32 exact, and do their coefficients cluster?

If OMP's chosen texts were exact, their least-squares coefficients would all equal 1/N (N target tokens)
and subtracting their gradients would drop the layer-1/2 rank below d, where the exact span checks work
again. This prints, for one FedSGD batch, how many chosen texts are exact (the Secret is used for scoring
only), their coefficients, and the numerical rank of the layer-1/2 Q/K/V gradients after subtracting the
texts whose coefficient lies within 2 % of the median.

    python benchmarks/peel_probe.py --batch-size 32 --seed 2 --budget 240
"""

from __future__ import annotations

import argparse

import torch

from leaklab.attacks.gradient.dager import start_attack
from leaklab.attacks.gradient.dictionary import sentence_gradients, signal_params
from leaklab.attacks.gradient.somp import SompAttack, dedupe, select_by_omp, span_beam_decode, with_last_alternatives
from leaklab.attacks.gradient.subspace import numerical_rank
from leaklab.models.registry import ModelRef
from leaklab.threat.settings import client_update


def summed_gradient(loaded, texts: list[list[int]], params: list[str]) -> dict[str, torch.Tensor]:
    """Σ of the texts' next-token-loss gradients on ``params`` (the OMP atoms, on every coordinate)."""
    shapes = {p: loaded.model.get_parameter(p).shape for p in params}
    index = {p: torch.arange(shape.numel()) for p, shape in shapes.items()}
    total = sentence_gradients(loaded, texts, None, index).double().sum(0)
    out, start = {}, 0
    for p, shape in shapes.items():
        out[p] = total[start : start + shape.numel()].view(shape)
        start += shape.numel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--budget", type=float, default=240.0)
    args = ap.parse_args()
    obs, secret = client_update(ModelRef("smollm2-135m"), "rotten-tomatoes", args.batch_size, args.seed, 8, 32)
    attack = SompAttack(budget_s=args.budget)
    spans, n_known, _ = start_attack(obs)
    tokens = attack.token_set(spans)
    found = span_beam_decode(spans, tokens, args.batch_size, attack.opts)
    found = with_last_alternatives(spans, dedupe(found), attack.opts.last_alternatives)
    chosen, info = select_by_omp(spans, found, n_known, attack.opts)
    truth = {tuple(t) for t in secret.token_ids}
    coef = torch.tensor(info["omp_coef"])
    exact = [tuple(f.ids) in truth for f in chosen]
    print(f"dictionary {info['dictionary']}, chosen {len(chosen)}, exact {sum(exact)}")
    print("coefficients:", " ".join(f"{c:.2e}{'*' if e else ''}" for c, e in zip(coef.tolist(), exact, strict=True)))
    median = float(coef.median())
    trusted = [f.ids for f, c in zip(chosen, coef.tolist(), strict=True) if abs(c / median - 1) < 0.02]
    print(f"median {median:.3e}; {len(trusted)} texts within 2 % of it")
    if not trusted:
        return
    summed = summed_gradient(spans.loaded, trusted, signal_params(spans.loaded))
    for layer in (0, 1):
        for role, proj in spans.adapter.projections[layer]:
            resid = proj.matrix(obs.gradients[proj.param].double() - median * summed[proj.param].double())
            print(f"layer {layer} {role}: rank after peeling {numerical_rank(torch.linalg.svdvals(resid))}")


if __name__ == "__main__":
    main()
