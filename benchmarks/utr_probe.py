"""UTR-style sentence evidence under LoRA r = 8 (smollm2-135m, rotten-tomatoes, short texts: 8–32 tokens).

``grants``: what the LoRA update shares (tensor kinds, which are zero) and the adapter pseudo-gradients' ranks on
every adapted module (r = saturated: no span or token-presence test), plus the additivity check: the sum of the
texts' own adapter gradients (:func:`leaklab.attacks.gradient.utr.prefix_adapter_gradients`) against the update.
``teacher``: with each text's true prefix (and the other texts' true gradients fitted, or not), the rank of the true
next token among the LM's top-W guesses by the residual the prefix gradient leaves, against the LM prior's rank.
``filter``: over the whole vocabulary, the true next token's rank by a matched filter (each logit's change along the
module-weighted update, finite difference) against the prior's.
``starts``: the residual left by each true prefix, and the true first pair's rank by the LM and the residual.
``bag``: the granted token set alone (no gradient), in the LM's greedy order, scored: what the grant gives.
``decode``: SOMP (the span attack, the setting's 'no signal') and ``utr`` through the one runner on the same
batches, with and without the granted token set.

Rerun (OMP_NUM_THREADS=1; one lane):
  PYTHONPATH=src python benchmarks/utr_probe.py grants --batch-sizes 1 4 --seeds 0 1
  PYTHONPATH=src python benchmarks/utr_probe.py teacher --batch-sizes 1 --seeds 0 1
  PYTHONPATH=src python benchmarks/utr_probe.py filter --batch-sizes 1 4 --seeds 0 1
  PYTHONPATH=src python benchmarks/utr_probe.py starts --batch-sizes 1 4 --seeds 0 1
  PYTHONPATH=src python benchmarks/utr_probe.py bag --batch-sizes 1 4 --seeds 0 1
  PYTHONPATH=src python benchmarks/utr_probe.py decode --batch-sizes 1 --seeds 0 1 --cells somp granted -o budget_s=600
  PYTHONPATH=src python benchmarks/utr_probe.py decode --batch-sizes 4 --seeds 0 --cells somp granted \
      -o starts=2 -o width=12 -o edit_width=4 -o edit_rounds=4 -o passes=0 -o budget_s=800
  (not run this session: --batch-sizes 1 --seeds 0 --cells prior filter -o budget_s=600; the first decoder's
  prior-only cell is in decode-greedy-v1.json)
Writes benchmarks/results/gradient/utr/<command>.json (decode: resumable, cells already there are skipped).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from leaklab.attacks.gradient.utr import (
    GRANTED_TOKEN_SET,
    LORA_B,
    Decoder,
    Residual,
    UtrOptions,
    adapter_modules,
    module_weights,
    observed_vector,
    prefix_adapter_gradients,
)
from leaklab.attacks.gradient.views import adapter_rank
from leaklab.core.config import parse_pairs
from leaklab.experiments.runner import attack_batch
from leaklab.io import atomic_write_json
from leaklab.metrics import score_batch
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.lora import lora_model
from leaklab.threat.observation import ThreatFlags
from leaklab.threat.settings import sample_update

OUT = Path("benchmarks/results/gradient/utr")
MODEL, CORPUS, R = "smollm2-135m", "rotten-tomatoes", 8
FILTER_WIDTH = 32
NOTE = "timings on a 2-core CPU shared with other helpers' benchmarks (OMP_NUM_THREADS=1)"


def update(b: int, seed: int):
    return sample_update("lora", ModelRef(MODEL), CORPUS, b, seed, 8, 32, ThreatFlags(), r=R)


def names_of(obs) -> list[str]:
    return [n for n in obs.gradients if n.endswith(f"{LORA_B}.weight")]


def grants(b: int, seed: int) -> dict:
    obs, sec = update(b, seed)
    model = lora_model(obs.model, obs.meta["lora"])
    params = dict(model.named_parameters())
    kinds: dict[str, dict] = {}
    for n, g in obs.gradients.items():
        kind = "lora_A" if ".lora_A." in n else ("lora_B" if ".lora_B." in n else "other")
        k = kinds.setdefault(kind, {"tensors": 0, "nonzero_tensors": 0, "numbers": 0})
        k["tensors"] += 1
        k["nonzero_tensors"] += int(bool(g.any()))
        k["numbers"] += g.numel()
    ranks = []
    for n in names_of(obs):
        a = params[n.replace(".lora_B.", ".lora_A.")].detach().double()
        g = obs.gradients[n].double() @ torch.linalg.solve(a @ a.T, a)
        ranks.append(adapter_rank(g, R))
    names = names_of(obs)
    y = observed_vector(obs, names)
    with torch.enable_grad():
        per_text = prefix_adapter_gradients(model, adapter_modules(model, names), [list(t) for t in sec.token_ids])
    total = per_text.sum(0)
    cos = float(total @ y / (total.norm() * y.norm()))
    n_targets = sum(len(t) - 1 for t in sec.token_ids)
    scale_err = float((total / n_targets - y).norm() / y.norm())
    return {
        "B": b,
        "seed": seed,
        "tokens": sum(len(t) for t in sec.token_ids),
        "kinds": kinds,
        "adapter_ranks_min_max": [min(ranks), max(ranks)],
        "modules": len(ranks),
        "saturated_modules": sum(k >= R for k in ranks),
        "sum_of_text_gradients_cos": cos,
        "sum_over_targets_rel_err": scale_err,
    }


def teacher(b: int, seed: int, width: int = 24) -> dict:
    """Per position (≥ 2) of each text: whether the true next token is among the LM's top-W, and whether it
    ranks first among those W plus itself by the residual its prefix gradient leaves (the other texts' true
    gradients fitted: 'oracle'; nothing fitted: 'alone'; 'w': every module's block weighted equally), by the prior
    alone, and among the batch's token set (granted) by the oracle residual."""
    obs, sec = update(b, seed)
    model = lora_model(obs.model, obs.meta["lora"])
    names = names_of(obs)
    mods = adapter_modules(model, names)
    y = observed_vector(obs, names)
    w = module_weights(y, [obs.gradients[n].numel() for n in names])
    texts = [list(t) for t in sec.token_ids]
    vocab = sorted({x for t in texts for x in t})
    with torch.enable_grad():
        full = prefix_adapter_gradients(model, mods, texts)
    keys = ("in_top", "first_oracle", "first_alone", "first_oracle_w", "first_alone_w", "first_prior", "first_set")
    stats = dict.fromkeys(("positions", *keys), 0)
    t0 = time.perf_counter()
    for i, t in enumerate(texts):
        others = [full[j] for j in range(len(texts)) if j != i]
        fits = {
            "oracle": Residual(y, others),
            "alone": Residual(y, []),
            "oracle_w": Residual(y * w, [o * w for o in others]),
            "alone_w": Residual(y * w, []),
        }
        for k in range(2, len(t)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([t[:k]])).logits[0, -1]
            top = torch.topk(logits, width).indices.tolist()
            stats["positions"] += 1
            stats["in_top"] += int(t[k] in top)
            stats["first_prior"] += int(t[k] == top[0])
            cands = top if t[k] in top else [*top, t[k]]
            cands = list(dict.fromkeys(cands + vocab))
            with torch.enable_grad():
                g = prefix_adapter_gradients(model, mods, [[*t[:k], c] for c in cands])
            head = [j for j, c in enumerate(cands) if c in top or c == t[k]]
            truth = cands.index(t[k])
            for name, fit in fits.items():
                rows = g[head] * (w if name.endswith("_w") else 1.0)
                stats[f"first_{name}"] += int(head[int(torch.argmin(fit(rows)))] == truth)
            in_set = [j for j, c in enumerate(cands) if c in vocab]
            stats["first_set"] += int(in_set[int(torch.argmin(fits["oracle"](g[in_set])))] == truth)
    return {"B": b, "seed": seed, "width": width, **stats, "seconds": time.perf_counter() - t0}


def vocab_filter(b: int, seed: int) -> dict:
    """Teacher-forced, over the whole vocabulary: the true next token's rank by the matched filter −∂z_c/∂B·v
    (the change of each next-token logit when the adapters move along v = w²·y, central finite difference) and by
    the LM prior; and how often the union of the prior's top 24 and the filter's top 64 holds it."""
    obs, sec = update(b, seed)
    model = lora_model(obs.model, obs.meta["lora"])
    params = dict(model.named_parameters())
    names = names_of(obs)
    y = observed_vector(obs, names)
    v = y * module_weights(y, [obs.gradients[n].numel() for n in names]) ** 2
    tang, start = {}, 0
    for n in names:
        tang[n] = v[start : start + params[n].numel()].view_as(params[n]).float()
        start += params[n].numel()
    eps = 1e-2 / max(float(t.abs().max()) for t in tang.values())
    filt, prior, union, positions = [], [], 0, 0
    for t in [list(x) for x in sec.token_ids]:

        def logits(e: float, t=t) -> torch.Tensor:
            for n in names:  # B = e·v (the seeded init has B = 0, restored after)
                params[n].copy_(e * tang[n])
            out = model(input_ids=torch.tensor([t])).logits[0].double()
            for n in names:
                params[n].zero_()
            return out

        with torch.no_grad():
            zp, zm = logits(eps), logits(-eps)
        z, dz = (zp + zm) / 2, -(zp - zm) / (2 * eps)
        for k in range(1, len(t)):
            rf, rp = int((dz[k - 1] > dz[k - 1, t[k]]).sum()), int((z[k - 1] > z[k - 1, t[k]]).sum())
            filt.append(rf)
            prior.append(rp)
            union += int(rf < 64 or rp < 24)
            positions += 1
    return {
        "B": b,
        "seed": seed,
        "positions": positions,
        "filter_median_rank": float(torch.tensor(filt).median()),
        "prior_median_rank": float(torch.tensor(prior).median()),
        "prior_top24": sum(r < 24 for r in prior),
        "filter_top64": sum(r < 64 for r in filt),
        "union": union,
    }


def starts(b: int, seed: int) -> dict:
    """Why a text's start is hard: the module-weighted residual left by each true prefix of text 0 (nothing
    else fitted); the rank of each text's true first pair among all pairs of the granted set by the LM
    (:meth:`Decoder.starts`) and, at B = 1, by the residual."""
    obs, sec = update(b, seed)
    model = lora_model(obs.model, obs.meta["lora"])
    names = names_of(obs)
    y = observed_vector(obs, names)
    true = [list(t) for t in sec.token_ids]
    vocab = sorted({x for t in true for x in t})
    sizes = {n: obs.gradients[n].numel() for n in names}
    wide = UtrOptions(starts=10**6, first_width=10**6, width=10**6)
    dec = Decoder(model, load_model(obs.model).tokenizer, y, sizes, wide, vocab)
    fit = Residual(dec.y, [])
    t = true[0]
    with torch.enable_grad():
        trajectory = fit(dec.gradients([t[:k] for k in range(2, len(t) + 1)])).tolist()
    pairs = dec.starts()
    row = {"B": b, "seed": seed, "pairs": len(pairs), "lm_rank_of_true_starts": [pairs.index(x[:2]) for x in true]}
    if b == 1:
        with torch.enable_grad():
            res = fit(dec.gradients(pairs))
        row["residual_rank_of_true_start"] = int((res < res[pairs.index(t[:2])]).sum())
    return {**row, "true_prefix_residuals": [round(x, 3) for x in trajectory]}


def bag_baseline(b: int, seed: int) -> dict:
    """What the granted token set gives without any gradient: the set's tokens once each, in the LM's greedy
    order (after its document start), cut into B texts, scored like the attacks."""
    obs, sec = update(b, seed)
    loaded = load_model(obs.model)
    true = [list(t) for t in sec.token_ids]
    left, seq = sorted({x for t in true for x in t}), []
    with torch.no_grad():
        while left:
            logits = loaded.model(input_ids=torch.tensor([[0, *seq]])).logits[0, -1]
            best = max(left, key=lambda x: float(logits[x]))
            seq.append(best)
            left.remove(best)
    k = -(-len(seq) // b)
    texts = [seq[i * k : (i + 1) * k] for i in range(b)]
    agg = score_batch([loaded.decode(t) for t in texts], list(sec.texts), texts, true).aggregate()
    return {"B": b, "seed": seed, "rouge1": agg["rouge1"], "rouge2": agg["rouge2"]}


def decode(b: int, seed: int, opts: dict, done: set, cells: list[str]) -> Iterator[dict]:
    """SOMP, then utr without and with the granted token set, on one batch (cells in ``done`` skipped)."""
    obs, sec = update(b, seed)
    granted = replace(obs, meta={**obs.meta, GRANTED_TOKEN_SET: sorted({x for t in sec.token_ids for x in t})})
    runs = {
        "somp": ("somp", obs, {}),
        "granted": ("utr", granted, {**opts, "grant_token_set": True}),
        "prior": ("utr", obs, opts),
        "filter": ("utr", obs, {"filter_width": FILTER_WIDTH, **opts}),
    }
    for cell in cells:
        attack, o, options = runs[cell]
        if (b, seed, cell) in done:
            continue
        rec = attack_batch(attack, o, sec, seed=seed, options=options)
        agg = rec.aggregate or {}
        row = {
            "B": b,
            "seed": seed,
            "attack": attack,
            "cell": cell,
            "token_set_granted": bool(options.get("grant_token_set")),
            "options": rec.options,
            "status": rec.status,
            "reason": rec.reason,
            "rouge1": agg.get("rouge1"),
            "rouge2": agg.get("rouge2"),
            "exact_rate": agg.get("exact_rate"),
            "seconds": rec.attack_seconds,
            "residual": rec.info.get("residual"),
            "backward_rows": rec.info.get("backward_rows"),
            "recovered": rec.recovered,
            "true": list(sec.texts),
        }
        print(json.dumps({k: v for k, v in row.items() if k not in ("recovered", "true", "options")}), flush=True)
        yield row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("grants", "teacher", "filter", "starts", "bag", "decode"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("-o", "--utr-option", action="append", default=[], help="utr option key=value (decode)")
    ap.add_argument(
        "--cells",
        nargs="+",
        default=["somp", "granted", "prior"],
        choices=("somp", "granted", "prior", "filter"),
        help="decode: SOMP, utr with the granted token set, utr on the LM prior alone, utr on the prior + filter",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    load_model(ModelRef(MODEL))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.command}.json"
    out = json.loads(path.read_text())["rows"] if path.exists() and args.command == "decode" else []
    opts = parse_pairs(args.utr_option, "utr option")
    for b in args.batch_sizes:
        for s in args.seeds:
            if args.command == "decode":
                done = {(r["B"], r["seed"], r["cell"]) for r in out}
                for row in decode(b, s, opts, done, args.cells):  # resumable: each cell is written when done
                    out.append(row)
                    atomic_write_json(path, {"rows": out, "note": NOTE})
                continue
            row = {"grants": grants, "teacher": teacher, "filter": vocab_filter, "starts": starts, "bag": bag_baseline}[
                args.command
            ](b, s)
            print(json.dumps(row), flush=True)
            out.append(row)
    atomic_write_json(path, {"rows": out, "note": NOTE})


if __name__ == "__main__":
    main()
