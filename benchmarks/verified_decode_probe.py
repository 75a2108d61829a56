"""Free decoding with continuations verified by the whole gradient (longer beams + prefix evidence), against the
model's greedy decoding, from the same oracle starts.

For a few texts of one client update, the first ``--start`` tokens are given (oracle, to isolate the decoding
step from the choice of start tokens). Then, every step, the ``--cands`` best next tokens by the model's
prior are each continued greedily for ``--length`` − 1 tokens; each continuation is held against the observed
gradient with every text's current decoded prefix explained away, by the cosine in a K-FAC metric over every
block linear layer (:mod:`leaklab.attacks.gradient.prefix`), plus the standardised prior; the best
continuation's first ``--commit`` tokens are kept. Prints per text the longest correct prefix and the token
recall of the decoded text, for the verified decoder and for plain greedy decoding. The Secret is used for
the oracle starts and the scoring only.

    python benchmarks/verified_decode_probe.py --regime long --batch-size 16 --seed 100 --texts 4 --max-len 32
"""

from __future__ import annotations

import time

import torch
from prefix_probe import greedy, prior, standardise
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.prefix import (
    KfacMetric,
    PrefixScorer,
    block_linears,
    explain_away,
    loss_terms,
    second_moments,
    weight_gradients,
)
from leaklab.attacks.gradient.somp import model_samples
from leaklab.models import load_model


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def recall(found: list[int], true: list[int]) -> float:
    return len(set(found) & set(true)) / max(1, len(set(true)))


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--start", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--cands", type=int, default=8)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--commit", type=int, default=2)
    ap.add_argument("--ridge", type=float, default=1e-2, help="K-FAC ridge (x top eigenvalue); 0 = Euclidean")
    ap.add_argument("--prior-weight", type=float, default=1.0, help="weight of the standardised prior")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    obs, secret = probe_update(args)
    loaded = load_model(args.model)
    model = loaded.model
    modules = block_linears(loaded)
    target = {n: obs.gradients[n + ".weight"] for n in modules}
    t0 = time.perf_counter()
    if args.ridge > 0:
        with torch.no_grad():
            samples = model_samples(loaded, args.samples, 64, 0)[:, 1:]
        xx, dd = None, None
        for i in range(0, samples.shape[0], 4):
            part = samples[i : i + 4]
            a, d = second_moments(loss_terms(loaded, modules, part, torch.ones_like(part, dtype=torch.bool)))
            xx = a if xx is None else {n: xx[n] + a[n] for n in a}
            dd = d if dd is None else {n: dd[n] + d[n] for n in d}
        metric = KfacMetric.from_moments(xx, dd, args.ridge)
        del xx, dd
    else:
        metric = KfacMetric.identity(list(modules))
    texts = [list(t) for t in secret.token_ids]
    chosen = [b for b, t in enumerate(texts) if len(t) >= args.start + args.max_len][: args.texts]
    decoded = {b: texts[b][: args.start] for b in range(len(texts))}  # every text's oracle start is "known"
    with torch.no_grad():
        plain = {b: greedy(model, torch.tensor([texts[b][: args.start]]), args.max_len)[0].tolist() for b in chosen}
    while any(len(decoded[b]) < args.start + args.max_len for b in chosen):
        rows = [torch.tensor(decoded[b]) for b in range(len(texts))]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        known = weight_gradients(loss_terms(loaded, modules, ids, mask.bool(), mask))
        scorer = PrefixScorer(explain_away(target, known, metric)[0], metric)
        del known
        for b in chosen:
            seq = decoded[b]
            if len(seq) >= args.start + args.max_len:
                continue
            s = len(seq)
            with torch.no_grad():
                top = model(input_ids=torch.tensor([seq])).logits[0, -1].topk(args.cands).indices
                starts = torch.cat([torch.tensor([seq]).repeat(args.cands, 1), top.unsqueeze(1)], dim=1)
                cands = greedy(model, starts, args.length - 1)
                logp = prior(model, cands, s)
            cont = torch.zeros_like(cands, dtype=torch.bool)
            cont[:, s:] = True
            cos = scorer.cosines(loss_terms(loaded, modules, cands, cont))
            best = int((standardise(cos) + args.prior_weight * standardise(logp)).argmax())
            decoded[b] = cands[best, : s + args.commit].tolist()
        print(
            f"  decoded to {min(len(decoded[b]) for b in chosen)} tokens, {time.perf_counter() - t0:.0f} s", flush=True
        )
    for name, out in (("greedy prior", plain), ("verified", {b: decoded[b] for b in chosen})):
        prefixes = [common_prefix(out[b], texts[b]) - args.start for b in chosen]
        recalls = [recall(out[b][args.start :], texts[b][args.start : args.start + args.max_len]) for b in chosen]
        print(
            f"{name}: correct tokens after the start per text {prefixes} (mean {sum(prefixes) / len(prefixes):.2f}), "
            f"token recall {[round(r, 2) for r in recalls]} (mean {sum(recalls) / len(recalls):.3f})"
        )
    tok = loaded.tokenizer
    for b in chosen:
        print(f"text {b}: {tok.decode(texts[b][: args.start + args.max_len])!r}\n   got: {tok.decode(decoded[b])!r}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
