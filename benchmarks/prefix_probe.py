"""Teacher-forced: does the observed gradient prefer a text's true continuation over the model's own, once whole
continuations (not single tokens) are scored over every block linear layer (FedSpy-style prefix evidence)?

For a few texts and positions s of one client update: the true prefix P (s tokens); candidates are the true
continuation of L tokens and, for each of the model's top next tokens c ≠ the true one, c followed by the
model's greedy continuation (L − 1 tokens) — what a beam of the decoder would hold. Each candidate's
continuation gradient (its loss terms on P + continuation: an exact additive part of its text's gradient) is
held against the observed gradient G, or against G with the batch's true prefixes at s explained away (the
oracle state of a decoder that got every prefix right so far), by the cosine in a K-FAC metric
(:mod:`leaklab.attacks.gradient.prefix`; ridge 0 = the plain Euclidean cosine). Prints, per L and score, how
often the true continuation ranks first and in the top 3, next to the model's prior (Σ log p of the
continuation) and an equal-weight mix of the standardised cosine and prior. The Secret is used for the
teacher forcing and the scoring only.

With ``--cheap`` the one-token cases (L = 1) are also scored by the cheap approximation — each candidate's own
terms δ_s x_sᵀ only (:func:`leaklab.attacks.gradient.prefix.next_token_terms`: one KV-cached token per
candidate, every candidate of a case in one batched backward) — in the same metric against the same targets
("[own terms]" rows); the seconds per case of the exact and the cheap score and their rank agreement are
printed at the end.

    python benchmarks/prefix_probe.py --regime long --batch-size 16 --seed 100 --texts 4 --positions 3,10,30
    python benchmarks/prefix_probe.py --regime long --batch-size 16 --seed 100 --texts 4 --positions 3,5,10,20 \
        --lengths 1 --controls 4 --ridges 1e-2 --cheap
"""

from __future__ import annotations

import time

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.prefix import (
    KfacMetric,
    PrefixScorer,
    block_linears,
    explain_away,
    loss_terms,
    next_token_terms,
    sample_moments,
    weight_gradients,
)
from leaklab.models import load_model


def greedy(model, seqs: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = model(input_ids=seqs).logits[:, -1].argmax(-1, keepdim=True)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs


def candidates(
    model, texts: list[list[int]], b: int, s: int, n: int, length: int, controls: int
) -> tuple[torch.Tensor, int]:
    """(rows, s + length) and the number of model rows: row 0 the true text b, rows 1..n − 1 the prior's top
    tokens ≠ the true one, greedily continued; then the controls: the true continuation shifted by one token
    (the batch's right tokens, misaligned) and the continuations at s of ``controls`` other batch texts (batch
    tokens in the wrong context)."""
    text = texts[b]
    prefix = torch.tensor(text[:s]).unsqueeze(0)
    top = model(input_ids=prefix).logits[0, -1].topk(n).indices.tolist()
    wrong = [t for t in top if t != text[s]][: n - 1]
    starts = torch.cat([prefix.repeat(len(wrong), 1), torch.tensor(wrong).unsqueeze(1)], dim=1)
    rows = [torch.tensor(text[: s + length]).unsqueeze(0), greedy(model, starts, length - 1)]
    if controls > 0:
        rows.append(torch.tensor(text[:s] + text[s + 1 : s + 1 + length]).unsqueeze(0))
        others = [t for i, t in enumerate(texts) if i != b and len(t) >= s + length][:controls]
        rows += [torch.tensor(text[:s] + t[s : s + length]).unsqueeze(0) for t in others]
    return torch.cat(rows), 1 + len(wrong)


def prior(model, seqs: torch.Tensor, s: int) -> torch.Tensor:
    logp = torch.log_softmax(model(input_ids=seqs).logits[:, :-1].float(), -1)
    return logp.gather(2, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)[:, s - 1 :].sum(1)


def standardise(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean()) / v.std().clamp_min(1e-12)


def table(hits: dict[tuple, list[int]]) -> None:
    print("\n| L | score | true continuation first | top 3 | cases |")
    print("|---|---|---|---|---|")
    for (length, name), ranks in hits.items():
        first = sum(r == 0 for r in ranks) / len(ranks)
        top3 = sum(r < 3 for r in ranks) / len(ranks)
        print(f"| {length} | {name} | {first:.3f} | {top3:.3f} | {len(ranks)} |", flush=True)


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--positions", default="3,10,30")
    ap.add_argument("--lengths", default="1,4,8")
    ap.add_argument("--cands", type=int, default=12, help="candidates per position (the true one included)")
    ap.add_argument("--ridges", default="0,1e-2", help="K-FAC ridges (x top eigenvalue); 0 = Euclidean")
    ap.add_argument("--samples", type=int, default=16, help="model samples for the metric's second moments")
    ap.add_argument("--controls", type=int, default=0, help="add controls: shifted truth + this many other texts")
    ap.add_argument("--cheap", action="store_true", help="L = 1: also the own-terms approximation, timed")
    args = ap.parse_args()
    torch.manual_seed(0)
    obs, secret = probe_update(args)
    loaded = load_model(args.model)
    model = loaded.model
    modules = block_linears(loaded)
    target = {n: obs.gradients[n + ".weight"] for n in modules}
    texts = [list(t) for t in secret.token_ids]
    positions = [int(p) for p in args.positions.split(",")]
    lengths = [int(v) for v in args.lengths.split(",")]
    t0 = time.perf_counter()
    xx, dd = sample_moments(loaded, modules, args.samples, 64)
    metrics = {
        r: (KfacMetric.identity(list(modules)) if float(r) == 0 else KfacMetric.from_moments(xx, dd, float(r)))
        for r in args.ridges.split(",")
    }
    del xx, dd
    print(
        f"{args.regime} B={args.batch_size} seed {args.seed}: T={sum(secret.lengths)}; metric from "
        f"{args.samples} samples in {time.perf_counter() - t0:.0f} s"
    )
    hits: dict[tuple, list[int]] = {}
    timing = {"exact": 0.0, "own terms": 0.0}
    agree: list[float] = []
    for s in positions:
        rows = [t[:s] for t in texts if len(t) > s]
        known_ids = torch.tensor(rows)  # every text longer than s: no padding
        known = weight_gradients(loss_terms(loaded, modules, known_ids, torch.ones_like(known_ids, dtype=torch.bool)))
        scorers = {}
        for r, metric in metrics.items():
            if float(r) > 0:  # the plain cosine over G is the per-token probe's score, already measured
                scorers[f"cos r={r}"] = PrefixScorer(target, metric)
            resid, alpha = explain_away(target, known, metric)
            scorers[f"cos r={r}, prefixes explained away"] = PrefixScorer(resid, metric)
            del resid
            print(f"s={s}: ridge {r}: fitted α {alpha:.3e} (1/N = {1 / sum(len(t) - 1 for t in texts):.3e})")
        for b, text in enumerate(texts[: args.texts]):
            if len(text) < s + max(lengths):
                continue
            if len(text) < s + max(lengths) + 1:
                continue
            with torch.no_grad():
                cands, n_model = candidates(model, texts, b, s, args.cands, max(lengths), args.controls)
            for length in lengths:
                seqs = cands[:, : s + length]
                # rows with the same continuation as the true one (a greedy path that is right) are dropped
                same = (seqs[:, s:] == seqs[0, s:]).all(1)
                same[0] = False
                seqs = seqs[~same]
                cont = torch.zeros_like(seqs, dtype=torch.bool)
                cont[:, s:] = True
                with torch.no_grad():
                    logp = prior(model, seqs, s)
                t1 = time.perf_counter()
                terms = loss_terms(loaded, modules, seqs, cont)
                scores = {"prior Σ log p": logp}
                for name, scorer in scorers.items():
                    cos = scorer.cosines(terms)
                    scores[name] = cos
                    scores[name + " + prior (standardised)"] = standardise(cos) + standardise(logp)
                if args.cheap and length == 1:
                    timing["exact"] += time.perf_counter() - t1
                    scores.update(cheap_scores(loaded, modules, seqs, s, scorers, timing))
                    for name in scorers:
                        agree.append(spearman(scores[name], scores[name + " [own terms]"]))
                model_rows = torch.arange(seqs.shape[0]) < n_model - int(same.sum())
                for name, v in scores.items():
                    hits.setdefault((length, name), []).append(int((v > v[0]).sum()))
                    if args.controls:  # the true continuation against the controls alone
                        hits.setdefault((length, name + " [vs controls]"), []).append(
                            int((v[~model_rows] > v[0]).sum())
                        )
                        hits.setdefault((length, name + " [vs model rows]"), []).append(
                            int((v[model_rows] > v[0]).sum())
                        )
            print(f"  text {b} s={s} done, {time.perf_counter() - t0:.0f} s", flush=True)
        del scorers, known
        table(hits)
    if args.cheap:
        cases = len(hits.get((1, "prior Σ log p"), [])) or 1
        print(
            "seconds per L = 1 case (terms and cosines against every target): exact "
            f"{timing['exact'] / cases:.2f}, own terms {timing['own terms'] / cases:.2f}; Spearman ρ of the two "
            f"cosines over a case's candidates: mean {sum(agree) / max(len(agree), 1):.3f}, min "
            f"{min(agree, default=float('nan')):.3f}"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


def cheap_scores(loaded, modules, seqs: torch.Tensor, s: int, scorers: dict, timing: dict) -> dict:
    """The own-terms cosines of the case's candidate tokens seqs[:, s] after the shared prefix seqs[0, :s],
    all in one batched backward; the time goes to ``timing['own terms']``."""
    t1 = time.perf_counter()
    terms = next_token_terms(loaded, modules, seqs[:1, :s], seqs[:, s].unsqueeze(0))
    out = {name + " [own terms]": scorer.next_cosines(terms)[0] for name, scorer in scorers.items()}
    timing["own terms"] += time.perf_counter() - t1
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = standardise(a.argsort().argsort().double()), standardise(b.argsort().argsort().double())
    return float((ra * rb).sum() / (a.numel() - 1))


if __name__ == "__main__":
    main()
