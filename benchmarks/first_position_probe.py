"""Teacher-forced probe of SOMP's next-token evidence at the first positions of the texts (full-rank regime).

Every text is fed its true prefix through :class:`leaklab.attacks.gradient.somp.NextTokenEvidence` (as SOMP
decodes, all texts in lockstep, the decoded positions explained away) and, per position, the share of texts
whose true next token ranks first among SOMP's token pool is printed for the output-gradient filter (whitened,
as SOMP runs it; capped at the first position), the filter + 0.1 log p_model (SOMP's mix), the model's prior
alone, and the prior with a BOS token prepended (the victim's texts have none). At the first position the
filter's uncapped first choice is counted too: the first position is an attention sink, so its lm_head input
is nearly the same whatever the token. The Secret is used to feed the true prefixes and to score only.

    python benchmarks/first_position_probe.py --regime short --batch-size 64 --seed 100
"""

from __future__ import annotations

from collections import Counter

import torch
from probe_setup import probe_parser, probe_update

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.attacks.gradient.somp import NextTokenEvidence, SompAttack, SompOptions


def main() -> None:
    ap = probe_parser(__doc__, regime="short", batch_size=64)
    ap.add_argument("--positions", type=int, default=8)
    args = ap.parse_args()
    obs, secret = probe_update(args)
    spans = SpanModel(obs)
    tokens = SompAttack().token_set(spans)
    col = {int(t): j for j, t in enumerate(tokens.tolist())}
    tok = spans.loaded.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    n_pos = args.positions
    seqs = torch.tensor([list(t)[: n_pos + 1] for t in secret.token_ids if len(t) > n_pos])
    ev = NextTokenEvidence(spans, tokens, explain=SompOptions().explain, whiten=SompOptions().whiten)
    rates: dict[str, list[float]] = {}
    for s in range(n_pos):
        logp, z = ev.step(seqs[:, : s + 1])
        with torch.no_grad():
            with_bos = torch.cat([torch.full((seqs.shape[0], 1), bos), seqs[:, : s + 1]], 1)
            logp_bos = torch.log_softmax(spans.loaded.model(with_bos).logits[:, -1].double()[:, tokens], 1)
        y = torch.tensor([col.get(int(t), -1) for t in seqs[:, s + 1]])
        if s == 0:
            raw = ev.filter_z(ev._last[0])  # the same positions, without the first-position cap
            picks = Counter(tok.decode([int(tokens[j])]) for j in raw.argmax(1).tolist())
            top, count = picks.most_common(1)[0]
            print(f"first position, uncapped filter: {count} of {seqs.shape[0]} texts get {top!r} as first choice")
        for name, score in (
            ("filter", z),
            ("filter + 0.1 log p", z + 0.1 * logp),
            ("prior", logp),
            ("prior with BOS", logp_bos),
        ):
            rates.setdefault(name, []).append(float((score.argmax(1) == y).float().mean()))
        ev.select(torch.arange(seqs.shape[0]), y.clamp_min(0))
    print(f"{args.regime} B={args.batch_size} seed {args.seed}: {seqs.shape[0]} texts; first-choice rate by position")
    for name, vals in rates.items():
        print(f"  {name:20s} " + " ".join(f"{v:.2f}" for v in vals))


if __name__ == "__main__":
    main()
