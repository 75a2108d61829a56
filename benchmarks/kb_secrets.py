"""Planted secrets in a knowledge base, extracted through similarity queries (kb-secrets), per search-API setting.

Victim: ``--docs`` private-split paragraphs of bbc-news with ``--secrets`` records planted from three templates
(PIN, diagnosis, VPN password), indexed with minilm-l6. Per API setting (scores, ids only, noised scores,
quantised scores): exact recovery per template and slot type, queries per secret, recovery against the query
budget; the streaming monitor replayed on the attacker's queries (detection point, secrets obtained before it,
TPR at 1% FPR against normal search traffic); daily quotas and the rate limit; recall@10 of held-out queries.

    flock /work/heavy.lock python benchmarks/kb_secrets.py            # writes benchmarks/results/kb-secrets/
    python benchmarks/kb_secrets.py --docs 200 --secrets 9 --out /tmp/kbs   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import time
from pathlib import Path

import numpy as np

from leaklab.attacks.embedding.kb import HiddenKB
from leaklab.attacks.embedding.kbsecrets import (
    KbSecretsConfig,
    LocalSearch,
    SearchAccess,
    VectorSearch,
    recover_vectors,
    run_secrets,
    score_guesses,
)
from leaklab.core import parse_pairs
from leaklab.corpora import load_corpus
from leaklab.corpora.sampling import split_of
from leaklab.encoders import Encoder, load_encoder
from leaklab.io import atomic_write_json, atomic_write_text
from leaklab.service.config import Limits, MonitorConfig
from leaklab.service.monitor import Monitor
from leaklab.service.search_scores import ScoreView
from leaklab.service.traffic import benign, load_pools
from leaklab.threat.kbsecrets import PlantedKB, plant_secrets

SETTINGS = {
    "scores": ScoreView(),
    "ids-only": ScoreView(scores=False),
    "noise-0.01": ScoreView(noise=0.01),
    "noise-0.05": ScoreView(noise=0.05),
    "quantised-0.05": ScoreView(step=0.05),
}
TEMPLATES = ("pin", "diagnosis", "vpn")
MONITOR_REPLAY = 5000  # attacker queries replayed through the monitor per setting (the flag comes far earlier)


class MemoEncoder:
    """The victim encoder with a text → vector memo (identical queries across settings embed once); the
    counting is the search adapters', not this."""

    def __init__(self, inner: Encoder) -> None:
        self.inner, self.name, self.dim, self.tokenizer = inner, inner.name, inner.dim, inner.tokenizer
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.inner.embed(new), strict=True))
        return np.stack([self.memo[t] for t in texts])


def held_out_queries(docs: list[str], ids: list[str], n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A contiguous half of the words of ``n`` random documents (≥ 8 words): a user's search and its answer."""
    pool = [i for i, d in enumerate(docs) if len(d.split()) >= 8]
    pick = rng.choice(pool, size=min(n, len(pool)), replace=False)
    queries = []
    for i in pick:
        w = docs[i].split()
        length = max(4, len(w) // 2)
        start = int(rng.integers(0, len(w) - length + 1))
        queries.append(" ".join(w[start : start + length]))
    return queries, [ids[i] for i in pick]


def recall_at_10(index: HiddenKB, view: ScoreView, queries: list[str], answers: list[str], seed: int) -> float:
    sims = index.similarities(queries)
    hits = view.top_k(sims, index.ids, 10, np.random.default_rng(seed))
    return float(np.mean([a in {d for d, _ in h} for h, a in zip(hits, answers, strict=True)]))


def attack_setting(
    kb: PlantedKB, search: SearchAccess, endpoint: LocalSearch, cfg: KbSecretsConfig, seed: int, api: str
) -> dict:
    """Run the attack for every template through ``search``; the victim endpoint's counts and the scores."""
    start = time.perf_counter()
    results, templates = run_secrets(search, cfg, seed)
    scored = score_guesses(kb, results, templates)
    row = {
        "api": api,
        "queries": endpoint.queries,
        "requests": endpoint.requests,
        "queries_per_secret": endpoint.queries / len(kb.secrets),
        "search_queries": search.queries,
        "exact_share": scored["exact_share"],
        "located_share": scored["located_share"],
        "exact_by_template": scored["exact_by_template"],
        "slot_accuracy": scored["slot_accuracy"],
        "signal": {n: r.mode for n, r in results.items()},
        "noisy_detected": {n: r.noisy for n, r in results.items()},
        "quantised_detected": {n: r.quantised for n, r in results.items()},
        "per_secret": scored["per_secret"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(api, {k: row[k] for k in ("queries_per_secret", "exact_share", "slot_accuracy", "seconds")}, flush=True)
    return row


def monitor_trace(encoder: MemoEncoder, texts: list[str], cfg: MonitorConfig) -> tuple[int | None, float]:
    """Replay ``texts`` through the service's monitor: the query count at the first flag (None: never) and the
    highest score."""
    mon = Monitor(
        cfg.window, cfg.min_queries, cfg.threshold, frozenset(w for w in encoder.tokenizer.get_vocab() if w.isalpha())
    )
    vecs = encoder.embed(texts)
    first, top = None, 0.0
    for i, (t, v) in enumerate(zip(texts, vecs, strict=True)):
        verdict = mon.observe("k", [t], v[None, :], ts=float(i) / 10)
        top = max(top, verdict.score if i + 1 >= cfg.min_queries else 0.0)
        if verdict.flagged and first is None:
            first = i + 1
    return first, top


def share_by(per_secret: list[dict], budget: float) -> float:
    return float(
        np.mean([r["exact"] and r["settled_at"] is not None and r["settled_at"] <= budget for r in per_secret])
    )


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    enc = MemoEncoder(load_encoder("minilm-l6"))
    base = [t for t in load_corpus("bbc-news:paragraphs").texts if split_of(t) == "private"][: args.docs]
    kb = plant_secrets(base, list(TEMPLATES), args.secrets, args.seed)
    t0 = time.perf_counter()
    index = HiddenKB(kb.docs, enc, ids=kb.ids)  # type: ignore[arg-type]
    out: dict = {"docs": len(kb.docs), "secrets": len(kb.secrets), "index_seconds": time.perf_counter() - t0}
    cfg = KbSecretsConfig.from_dict({"templates": ";".join(TEMPLATES), **parse_pairs(args.opt)})
    planted = {s.doc_id for s in kb.secrets}
    plain = [(d, i) for d, i in zip(kb.docs, kb.ids, strict=True) if i not in planted]
    held_q, held_a = held_out_queries([d for d, _ in plain], [i for _, i in plain], args.held_out, rng)
    settings, traces = {}, {}
    for name, view in SETTINGS.items():
        endpoint = LocalSearch(index, view, seed=args.seed)
        settings[name] = attack_setting(kb, endpoint, endpoint, cfg, args.seed, view.label())
        settings[name]["recall_at_10"] = recall_at_10(index, view, held_q, held_a, args.seed)
        traces[name] = endpoint.trace
    endpoint = LocalSearch(index, ScoreView(), seed=args.seed)
    if args.variant_chunk:
        name = f"scores, digit_chunk={args.variant_chunk}"
        chunked = dataclasses.replace(cfg, digit_chunk=args.variant_chunk)
        settings[name] = attack_setting(kb, endpoint, endpoint, chunked, args.seed, "scores-rounded(4)")
        settings[name]["recall_at_10"] = settings["scores"]["recall_at_10"]
        traces[name] = endpoint.trace
        endpoint = LocalSearch(index, ScoreView(), seed=args.seed)
    vectors, spent = recover_vectors(endpoint, enc, list(cfg.parsed().values()), None, cfg.probes, cfg.top_k, args.seed)
    known = attack_setting(kb, VectorSearch(enc, vectors), endpoint, cfg, args.seed, "scores-rounded(4), encoder known")
    known["recall_at_10"] = settings["scores"]["recall_at_10"]
    known["offline_queries"], known["recovered_vectors"] = known.pop("search_queries"), len(vectors)
    for row in known["per_secret"]:
        row["settled_at"] = spent if row["settled_at"] is not None else None
    settings["encoder-known"] = known
    traces["encoder-known"] = endpoint.trace
    out["settings"] = settings
    if args.cache:
        args.cache.write_bytes(pickle.dumps((out, traces, held_q)))
    return finish(out, traces, held_q, enc, rng)


def finish(out: dict, traces: dict, held_q: list[str], enc: MemoEncoder, rng: np.random.Generator) -> dict:
    """The monitor and quota measurements on the attack traces."""
    out["monitor"] = monitor_eval(enc, traces, held_q, rng, out["settings"])
    out["quotas"] = quota_eval(enc, traces["scores"], out["settings"]["scores"]["per_secret"])
    return out


def monitor_eval(enc: MemoEncoder, traces: dict, held_q: list[str], rng: np.random.Generator, settings: dict) -> dict:
    """Detection point per setting (service defaults), and TPR at 1% FPR: attack windows against normal search
    sessions (held-out KB searches, review, news and chat users), each scored by its highest monitor score."""
    cfg = MonitorConfig()
    out: dict = {"threshold": cfg.threshold, "window": cfg.window, "min_queries": cfg.min_queries, "detect": {}}
    for name, trace in traces.items():
        first, _ = monitor_trace(enc, trace[:MONITOR_REPLAY], cfg)
        per = settings[name]["per_secret"]
        out["detect"][name] = {
            "flag_at_query": first,
            "secrets_before_flag": share_by(per, first) if first else share_by(per, float("inf")),
        }
    length = 64
    pools = load_pools()
    normal = [held_q[i : i + length] for i in range(0, len(held_q) - length + 1, length)]
    for kind in ("reviews", "chat", "news"):
        normal += [benign(kind, pools, rng, length) for _ in range(8)]
    attack = []
    for trace in traces.values():
        for start in rng.integers(0, max(1, len(trace) - length), size=6):
            attack.append(trace[int(start) : int(start) + length])
    normal_scores = np.array([monitor_trace(enc, s, cfg)[1] for s in normal])
    attack_scores = np.array([monitor_trace(enc, s, cfg)[1] for s in attack])
    thr = float(np.quantile(normal_scores, 0.99, method="higher"))
    out.update(
        {
            "normal_sessions": len(normal),
            "attack_sessions": len(attack),
            "session_length": length,
            "normal_flagged_at_default": int(sum(monitor_trace(enc, s, cfg)[0] is not None for s in normal)),
            "normal_max_score": float(normal_scores.max()),
            "attack_min_score": float(attack_scores.min()),
            "threshold_1pct_fpr": thr,
            "tpr_at_1pct_fpr": float(np.mean(attack_scores > thr)),
            "fpr_measured": float(np.mean(normal_scores > thr)),
        }
    )
    return out


def quota_eval(enc: MemoEncoder, trace: list[str], per_secret: list[dict]) -> dict:
    """Service default limits against the scores-setting attack: requests of 64 queries, tokens, time at the
    rate limit; and per-key daily query quotas: share of secrets on day one, days to finish."""
    lim = Limits()
    tokens = int(sum(len(x) for x in enc.tokenizer(trace)["input_ids"]))
    queries = len(trace)
    requests = -(-queries // 64)
    quotas = {}
    for q in (100, 1000, 10000):
        quotas[str(q)] = {"day_one_share": share_by(per_secret, q), "days": int(-(-queries // q))}
    return {
        "queries": queries,
        "requests_of_64": requests,
        "tokens": tokens,
        "default_daily_requests": lim.daily_requests,
        "default_daily_tokens": lim.daily_tokens,
        "days_at_defaults": max(requests / lim.daily_requests, tokens / lim.daily_tokens),
        "seconds_at_rate_limit": requests / lim.rate,
        "daily_query_quota": quotas,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    n = res["secrets"]
    for name, s in res["settings"].items():
        per = s["per_secret"]
        budgets = np.unique([r["settled_at"] for r in per if r["settled_at"]] + [s["queries"]])
        ax.step(budgets / n, [share_by(per, b) for b in budgets], where="post", label=f"{name} ({s['api']})")
    for name, d in res["monitor"]["detect"].items():
        if d["flag_at_query"] and name == "scores":
            ax.axvline(d["flag_at_query"] / n, color="k", ls=":", label="monitor flag (scores)")
    ax.set_xscale("log")
    ax.set_xlabel("queries sent, per planted secret")
    ax.set_ylabel("share of secrets recovered exactly")
    ax.set_title(f"kb-secrets on minilm-l6: {n} secrets in {res['docs']} documents")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def table(res: dict) -> str:
    kinds = sorted({k for s in res["settings"].values() for k in s["slot_accuracy"]})
    head = ["API setting", "queries/secret", "exact", *[f"exact {t}" for t in TEMPLATES], *kinds, "recall@10"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in res["settings"].items():
        cells = [
            f"{name} (`{s['api']}`)",
            f"{s['queries_per_secret']:.0f}",
            f"{s['exact_share']:.0%}",
            *[f"{s['exact_by_template'].get(t, 0):.0%}" for t in TEMPLATES],
            *[f"{s['slot_accuracy'].get(k, 0):.0%}" for k in kinds],
            f"{s['recall_at_10']:.3f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def verdict(ok: bool) -> str:
    return "**reached**" if ok else "**missed**"


def summary(res: dict) -> str:
    """The Markdown report: scale, command, table, the targets with their measured values, monitor and quotas."""
    sc, ids = res["settings"]["scores"], res["settings"]["ids-only"]
    mon, quo = res["monitor"], res["quotas"]
    det = mon["detect"]["scores"]
    pins, names = sc["slot_accuracy"].get("digits4", 0.0), sc["slot_accuracy"].get("name", 0.0)
    early_flag = det["flag_at_query"] is not None and det["secrets_before_flag"] < 0.1
    within = sc["queries_per_secret"] <= 2000
    lines = [
        "# kb-secrets: planted secrets extracted from a knowledge base through similarity queries",
        "",
        f"minilm-l6; {res['docs']} documents (bbc-news paragraphs, private split, plus {res['secrets']} planted "
        f"records over the templates {', '.join(TEMPLATES)}); top_k 100. Wall time {res['seconds']:.0f} s on the "
        "shared 2-core CPU.",
        "",
        f"    {res['command']}",
        "",
        "Exact recovery (all slots of a record right) per template, per slot type (share of slots right), queries "
        "per planted secret (every query of the attack, shared ones divided over all secrets), and recall@10 of "
        "the right document for held-out searches (half of a document's words) under the same API setting:",
        "",
        table(res),
        "",
        "![recovery against the query budget](recovery.png)",
        "",
        "## Targets",
        "",
        f"- Scores exposed, ≥ 90 % of 4-digit PINs and ≥ 90 % of names exactly with ≤ 2,000 queries per secret: "
        f"{verdict(pins >= 0.9 and names >= 0.9 and within)} — 4-digit PINs exact {pins:.0%}, names "
        f"{names:.0%}, {sc['queries_per_secret']:.0f} queries per secret.",
        f"- Ranks only (ids-only API): {ids['exact_share']:.0%} of records exact, slot accuracy "
        + ", ".join(f"{k} {v:.0%}" for k, v in ids["slot_accuracy"].items())
        + f"; {ids['queries_per_secret']:.0f} queries per secret.",
        f"- The monitor flags the attack before it has recovered 10 % of the secrets, with no flag on normal traffic: "
        f"{verdict(early_flag and mon['normal_flagged_at_default'] == 0)}"
        f" — flagged at query {det['flag_at_query']} with {det['secrets_before_flag']:.0%} of the secrets "
        f"recovered; {mon['normal_flagged_at_default']} of {mon['normal_sessions']} normal sessions flagged at the "
        f"service default threshold {mon['threshold']}; TPR at 1 % FPR {mon['tpr_at_1pct_fpr']:.2f} "
        f"({mon['attack_sessions']} attack windows of {mon['session_length']} queries against {mon['normal_sessions']} "
        f"normal sessions; threshold {mon['threshold_1pct_fpr']:.3f}, the highest normal score, as 1 % of "
        f"{mon['normal_sessions']} sessions is below one).",
        "",
        "## Monitor detection point per API setting (service defaults)",
        "",
        "| API setting | flagged at query | secrets recovered before the flag |",
        "|---|---|---|",
        *[
            f"| {n} | {d['flag_at_query'] or f'not within {MONITOR_REPLAY}'} | {d['secrets_before_flag']:.0%} |"
            for n, d in mon["detect"].items()
        ],
        "",
        "## Rate limit and quotas (scores setting)",
        "",
        f"The attack sends {quo['queries']} queries ({quo['tokens']} tokens); in requests of 64 queries that is "
        f"{quo['requests_of_64']} requests, {quo['seconds_at_rate_limit']:.1f} s at the default rate limit and "
        f"{quo['days_at_defaults']:.2f} days of the default daily quotas ({quo['default_daily_requests']} requests, "
        f"{quo['default_daily_tokens']} tokens). A per-key daily quota counted in queries:",
        "",
        "| queries per key per day | secrets recovered on day one | days to finish |",
        "|---|---|---|",
        *[f"| {q} | {v['day_one_share']:.0%} | {v['days']} |" for q, v in quo["daily_query_quota"].items()],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000, help="corpus documents besides the planted records")
    ap.add_argument("--secrets", type=int, default=100, help="planted secrets (round-robin over 3 templates)")
    ap.add_argument("--held-out", type=int, default=320, help="held-out search queries (recall@10, normal traffic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt", action="append", default=[], help="a kb-secrets option, key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kb-secrets"))
    ap.add_argument("--variant-chunk", type=int, default=0, help="also run the scores setting with this digit_chunk")
    ap.add_argument("--cache", type=Path, help="save the attack results and traces here (pickle) before the monitor")
    ap.add_argument("--resume", type=Path, help="skip the attacks: load a --cache file, redo monitor and quotas")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.resume:
        out, traces, held_q = pickle.loads(args.resume.read_bytes())
        res = finish(out, traces, held_q, MemoEncoder(load_encoder("minilm-l6")), np.random.default_rng(args.seed))
    else:
        res = run(args)
    res["seconds"] = round(time.perf_counter() - start, 1)
    res["command"] = (
        "python benchmarks/kb_secrets.py " + f"--docs {args.docs} --secrets {args.secrets} --seed {args.seed}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", res)
    plot(res, args.out / "recovery.png")
    atomic_write_text(args.out / "table.md", table(res) + "\n")
    atomic_write_text(args.out / "README.md", summary(res))
    print(table(res))
    print(json.dumps({k: v for k, v in res.items() if k not in ("settings",)}, indent=1, default=str))


if __name__ == "__main__":
    main()
