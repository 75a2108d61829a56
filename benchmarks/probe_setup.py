"""Shared set-up of the probe scripts in benchmarks/: the common arguments and one FedSGD client update of a
benchmark regime (the Observation the attack sees and the Secret the probe scores against)."""

from __future__ import annotations

import argparse

from leaklab.bench.gradient import REGIMES
from leaklab.models.registry import ModelRef
from leaklab.threat.observation import Observation, Secret
from leaklab.threat.settings import client_update


def probe_parser(doc: str, regime: str = "long", batch_size: int = 16, seed: int = 100) -> argparse.ArgumentParser:
    """--model, --regime, --batch-size and --seed, with the script's first docstring line as description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--regime", default=regime, choices=sorted(REGIMES))
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seed", type=int, default=seed)
    return ap


def probe_update(args: argparse.Namespace) -> tuple[Observation, Secret]:
    """The client update of one batch of ``args.regime`` at ``args.batch_size`` and ``args.seed``."""
    regime = REGIMES[args.regime]
    return client_update(
        ModelRef(args.model), regime.corpus, args.batch_size, args.seed, regime.min_tokens, regime.max_tokens
    )
