"""Numerical rank of the layer-1/layer-2 attention spans near the hidden size, and DAGER's exact search on
the same batch: the largest drops of the singular-value spectrum, the rank estimate, the frontier sizes and
the time of :func:`leaklab.attacks.gradient.dager.decoder_search`. The Secret gives T for the printout only.

    python benchmarks/rank_probe.py --regime long --batch-size 4 --seed 2 --search
    python benchmarks/rank_probe.py --regime long --batch-size 4 --seed 2 --gap 100 --search --max-len 2   # old rule
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from leaklab.attacks.gradient.dager import DagerOptions, SpanModel, decoder_search
from leaklab.bench.gradient import REGIMES
from leaklab.models.registry import ModelRef
from leaklab.threat.settings import client_update


class FrontierLog(logging.Handler):
    """Collects the exact search's per-step frontier sizes (its debug log lines)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--regime", default="long", choices=sorted(REGIMES))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--search", action="store_true", help="also run DAGER's exact search and time it")
    ap.add_argument("--max-len", type=int, default=512, help="positions the exact search may grow")
    ap.add_argument("--gap", type=float, default=None, help="rank-gap factor instead of subspace.RANK_GAP")
    args = ap.parse_args()
    if args.gap is not None:  # numerical_rank's defaults were bound at import: replace them
        from leaklab.attacks.gradient import subspace

        subspace.numerical_rank.__defaults__ = (subspace.NOISE_FLOOR, args.gap)
    regime = REGIMES[args.regime]
    obs, secret = client_update(
        ModelRef(args.model), regime.corpus, args.batch_size, args.seed, regime.min_tokens, regime.max_tokens
    )
    total = sum(len(t) for t in secret.token_ids)
    spans = SpanModel(obs)
    print(f"{args.regime} B={args.batch_size} seed {args.seed}: T={total}, d={spans.adapter.hidden_size}")
    for name, sub in (("layer 1", spans.sub1), ("layer 2", spans.sub2)):
        s = sub.singular_values / sub.singular_values[0]
        ratio = s[:-1] / s[1:].clamp_min(1e-300)
        top = torch.topk(ratio, 3)
        drops = ", ".join(
            f"after #{int(i) + 1}: {float(s[i]):.2e} -> {float(s[i + 1]):.2e} ({float(v):.1f}x)"
            for v, i in zip(top.values, top.indices, strict=True)
        )
        print(f"  {name}: rank {sub.rank}; largest drops {drops}")
    if args.search:
        handler = FrontierLog()
        logger = logging.getLogger("leaklab.attacks.gradient.dager")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        t0 = time.perf_counter()
        found = decoder_search(spans, DagerOptions(max_len=args.max_len))
        widest = max(handler.lines, key=lambda line: int(line.rsplit("->", 1)[1].split()[0]), default="")
        print(f"  exact search: {len(found)} texts in {time.perf_counter() - t0:.1f} s; widest step: {widest}")


if __name__ == "__main__":
    main()
