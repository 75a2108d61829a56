"""Top-k against low-rank completion: how much of the span groups a global top-k keeps, their true numerical
rank, and the rank the adaptive attacker's held-out choice picks.

    python benchmarks/adaptive_rank_probe.py smollm2-135m 4 8 32 0.01
"""

import sys

import torch

from leaklab.attacks.gradient.adaptive import _stack, choose_rank, span_groups
from leaklab.defenses import make_defense
from leaklab.models import ModelRef, load_model
from leaklab.threat import ThreatFlags, client_update

m, B, lo, hi, f = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ref = ModelRef(m)
lm = load_model(ref)
obs, sec = client_update(ref, "rotten-tomatoes", B, 0, lo, hi, ThreatFlags())
d = make_defense("topk", fraction=f).apply(obs, seed=0)
print("distinct", len({t for s in sec.token_ids for t in s}), "tokens", sum(sec.lengths))
for g in span_groups(lm, d.gradients)[:2]:
    st = _stack(d.gradients, g)
    kept = st != 0
    full = _stack(obs.gradients, g)
    sv = torch.linalg.svdvals(full)
    print(
        st.shape,
        "kept",
        float(kept.double().mean()),
        "true numerical rank",
        int((sv > sv[0] * 1e-6).sum()),
        "chosen",
        choose_rank(st, kept, [r for r in (8, 16, 32, 64, 128, 256) if r <= min(st.shape) // 2], 15),
    )
