"""What a top-k-sparsified update keeps of the span groups that a kept-coordinates-only attacker could use, and
where the adaptive attacker's time goes (issue 25 probe; smollm2-135m, rotten-tomatoes 8–32 tokens, B = 4).

For each kept fraction: per span group (layer-1 and layer-2 Q/K/V stacked, 960 × 576) the share of entries
kept; the largest *fully kept* blocks found greedily (the c columns kept most often, then the rows kept on all
of them) and their numerical rank r. A block whose rank is below both its row count and c is saturated: its
row space is the span of the batch's inputs restricted to those c coordinates, so an exact span check on the
kept coordinates alone exists there (a token's c coordinates against a rank-r space). Then the seconds the
low-rank completion of ``somp-adaptive`` spends on the two attention groups (rank choice + hard-impute):

    python benchmarks/adaptive_topk_probe.py 0.5 0.1 0.01 [--seed 0] [--time-completion]
"""

from __future__ import annotations

import argparse
import time

import torch

from leaklab.attacks.gradient.adaptive import _complete, _stack, span_groups
from leaklab.attacks.gradient.subspace import numerical_rank
from leaklab.defenses import defended_update, make_defense
from leaklab.models import ModelRef, load_model

WIDTHS = (40, 60, 70, 80, 100, 120, 160)


def blocks(stack: torch.Tensor) -> list[tuple[int, int, int]]:
    """(columns c, fully kept rows, numerical rank) for the c most-kept columns, per width in :data:`WIDTHS`."""
    kept = stack != 0
    order = torch.argsort(kept.sum(0), descending=True)
    out = []
    for c in WIDTHS:
        rows = kept[:, order[:c]].all(1)
        sub = stack[rows][:, order[:c]]
        out.append((c, int(rows.sum()), numerical_rank(torch.linalg.svdvals(sub)) if int(rows.sum()) else 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fractions", nargs="*", type=float, default=[0.5, 0.1, 0.01])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-completion", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ref = ModelRef("smollm2-135m")
    loaded = load_model(ref)
    clean, _ = defended_update("fedsgd", ref, "rotten-tomatoes", 4, a.seed, [], 8, 32)
    for f in a.fractions:
        upd = make_defense("topk", fraction=f).apply(clean, seed=a.seed)
        groups = span_groups(loaded, upd.gradients)
        for i, g in enumerate(groups[:2]):
            stack = _stack(upd.gradients, g)
            found = blocks(stack)
            saturated = [(c, n, r) for c, n, r in found if r < min(n, c)]
            print(
                f"top-k {f:g}, layer {i + 1} group: {float((stack != 0).double().mean()):.3f} kept; "
                f"(columns, fully kept rows, rank): {found}; saturated: {saturated or 'none'}",
                flush=True,
            )
        if a.time_completion:
            grads = dict(upd.gradients)
            t0 = time.perf_counter()
            info = _complete(loaded, grads, groups, 60)
            print(f"  completion of the two attention groups: {time.perf_counter() - t0:.1f} s, {info}", flush=True)


if __name__ == "__main__":
    main()
