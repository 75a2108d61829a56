"""Cost of TAG's optimisation steps on smollm2-135m (issue 25: choose the step budget from it).

Runs ``tag`` with 1 and with 3 steps on batch 0 of the short regime (rotten-tomatoes 8–32 tokens) at B = 1, 4
and 8, through the runner; the difference over 2 steps is one step's cost, the rest is the setup (token set,
dummy batch, readout):

    python benchmarks/tag_step_cost.py
"""

from __future__ import annotations

import time

import torch

from leaklab.attacks.base import make_attack, run_attack
from leaklab.models import ModelRef
from leaklab.threat import ThreatFlags, client_update


def main() -> None:
    torch.set_num_threads(1)
    ref = ModelRef("smollm2-135m")
    for b in (1, 4, 8):
        obs, _ = client_update(ref, "rotten-tomatoes", b, 0, 8, 32, ThreatFlags())
        seconds = {}
        for steps in (1, 3):
            t0 = time.perf_counter()
            rec = run_attack(make_attack("tag", {"steps": steps}), obs)
            seconds[steps] = time.perf_counter() - t0
            print(f"B={b} steps={steps}: {rec.status}, {seconds[steps]:.1f} s", flush=True)
        step = (seconds[3] - seconds[1]) / 2
        print(f"B={b}: one step {step:.1f} s, setup {seconds[1] - step:.1f} s")


if __name__ == "__main__":
    main()
