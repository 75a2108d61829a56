"""Realistic query sessions for the probe detector: inversion/extraction loops against benign replay.

Attack sessions run the real loops against an encoder (the vectors they see are the service's):
greedy prefix search (token-by-token inversion), edit-chain hill climbing (corrector-style single-word edits),
knowledge-base extraction sweeps (keyword and one-slot template probes), and alignment-pair collection
(natural public sentences; by design indistinguishable from benign use). Benign sessions replay corpus
sentences, news paragraphs and chat lines in order, with occasional retries and typo fixes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from leaklab.corpora.sampling import split_of
from leaklab.encoders import Encoder
from leaklab.service.monitor import Monitor

Session = list[str]
ATTACKS = ("greedy-prefix", "edit-chain", "kb-sweep", "alignment-collect", "padded-edit-chain")
BENIGN = ("reviews", "news", "chat")


@dataclass
class Pools:
    reviews: list[str]
    news: list[str]
    chat: list[list[str]]  # conversations, in order
    public: list[str]  # attacker's auxiliary sentences
    vocab: list[str]  # attacker's frequent words
    targets: list[str]  # private texts whose vectors the attacker tries to invert


def load_pools(max_words: int = 40) -> Pools:
    """Pools from the packaged corpora; attackers use only the public split, targets are private."""
    from leaklab.corpora import load_corpus

    rt = [t for t in load_corpus("rotten-tomatoes").texts if len(t.split()) <= max_words]
    news = [" ".join(p.split()[:max_words]) for p in load_corpus("bbc-news:paragraphs").texts]
    chat_corpus = load_corpus("chatterbot:english")
    convs: dict[int, list[str]] = {}
    for text, label in zip(chat_corpus.texts, chat_corpus.labels, strict=True):
        convs.setdefault(label, []).append(text)
    public = [t for t in rt if split_of(t) == "public"]
    counts = Counter(w.lower().strip(".,!?;:'\"") for t in public for w in t.split())
    vocab = [w for w, _ in counts.most_common(3000) if w.isalpha()]
    targets = [t for t in rt if split_of(t) == "private" and 6 <= len(t.split()) <= 20]
    return Pools([t for t in rt if split_of(t) == "private"], news, list(convs.values()), public, vocab, targets)


def _cos(encoder: Encoder, texts: list[str], target: np.ndarray) -> np.ndarray:
    return encoder.embed(texts) @ target


def greedy_prefix(encoder: Encoder, pools: Pools, rng: np.random.Generator, n: int, beam: int = 8) -> Session:
    """Token-by-token inversion: extend the best prefix with ``beam`` candidate words, keep the closest."""
    target = encoder.embed([pools.targets[rng.integers(len(pools.targets))]])[0]
    prefix: list[str] = []
    queries: Session = []
    while len(queries) < n:
        cands = [" ".join([*prefix, w]) for w in rng.choice(pools.vocab[:1500], size=beam, replace=False)]
        cands = cands[: n - len(queries)]
        queries.extend(cands)
        prefix = cands[int(np.argmax(_cos(encoder, cands, target)))].split()
    return queries


def edit_chain(encoder: Encoder, pools: Pools, rng: np.random.Generator, n: int) -> Session:
    """Corrector-style hill climbing: replace one word of the current best guess; keep it if closer."""
    target = encoder.embed([pools.targets[rng.integers(len(pools.targets))]])[0]
    best = pools.public[rng.integers(len(pools.public))].split()[:12]
    best_cos = float(_cos(encoder, [" ".join(best)], target)[0])
    queries: Session = [" ".join(best)]
    while len(queries) < n:
        cand = list(best)
        cand[rng.integers(len(cand))] = str(pools.vocab[rng.integers(len(pools.vocab))])
        text = " ".join(cand)
        queries.append(text)
        c = float(_cos(encoder, [text], target)[0])
        if c > best_cos:
            best, best_cos = cand, c
    return queries


TEMPLATES = ("what about {w}", "documents about {w}", "{w} news", "tell me about {w}")


def kb_sweep(encoder: Encoder, pools: Pools, rng: np.random.Generator, n: int) -> Session:
    """Knowledge-base extraction: sweep keywords through one-slot templates to enumerate the documents."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    words = rng.choice(pools.vocab[:2000], size=n, replace=False)
    return [template.format(w=w) if rng.random() < 0.7 else str(w) for w in words]


def alignment_collect(encoder: Encoder, pools: Pools, rng: np.random.Generator, n: int) -> Session:
    """Collect (text, vector) pairs of natural public sentences to fit an alignment map."""
    idx = rng.choice(len(pools.public), size=n, replace=False)
    return [pools.public[i] for i in idx]


def padded_edit_chain(encoder: Encoder, pools: Pools, rng: np.random.Generator, n: int, pad: int = 3) -> Session:
    """Evasion: the edit-chain loop with ``pad`` natural public sentences after every probe (pad+1 × cost)."""
    probes = edit_chain(encoder, pools, rng, n // (pad + 1) + 1)
    out: Session = []
    for p in probes:
        out.append(p)
        out.extend(pools.public[i] for i in rng.choice(len(pools.public), size=pad, replace=False))
    return out[:n]


def _with_retries(texts: list[str], rng: np.random.Generator) -> Session:
    """Real users sometimes resend a query or fix a typo in it (5% each)."""
    out: Session = []
    for t in texts:
        out.append(t)
        r = rng.random()
        if r < 0.05:
            out.append(t)
        elif r < 0.10 and len(t.split()) > 2:
            ws = t.split()
            i = int(rng.integers(len(ws)))
            ws[i] = ws[i][:-1] if len(ws[i]) > 3 else ws[i] + "s"
            out.append(" ".join(ws))
    return out


def benign(kind: str, pools: Pools, rng: np.random.Generator, n: int) -> Session:
    """A benign user's session: consecutive reviews, news paragraphs, or chat lines in conversation order."""
    if kind == "chat":
        lines: list[str] = []
        while len(lines) < n:
            conv = pools.chat[rng.integers(len(pools.chat))]
            start = int(rng.integers(max(1, len(conv) - 10)))
            lines.extend(conv[start : start + int(rng.integers(4, 16))])
        return _with_retries(lines, rng)[:n]
    pool = pools.reviews if kind == "reviews" else pools.news
    start = int(rng.integers(len(pool) - n))
    return _with_retries(pool[start : start + n], rng)[:n]


ATTACK_FNS: dict[str, Callable[[Encoder, Pools, np.random.Generator, int], Session]] = {
    "greedy-prefix": greedy_prefix,
    "edit-chain": edit_chain,
    "kb-sweep": kb_sweep,
    "alignment-collect": alignment_collect,
    "padded-edit-chain": padded_edit_chain,
}


def session_score(encoder: Encoder, texts: Session, monitor_kwargs: dict) -> float:
    """The monitor's score after the whole session (the same code path the server runs per query)."""
    mon = Monitor(**monitor_kwargs)
    vecs = encoder.embed(texts)
    verdict = None
    for i, (t, v) in enumerate(zip(texts, vecs, strict=True)):
        verdict = mon.observe("k", [t], v[None, :], ts=float(i))
    return verdict.score if verdict else 0.0


def tpr_at_fpr(
    benign_scores: np.ndarray, attack_scores: np.ndarray, fpr: float, calib: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Threshold = the (1−fpr) quantile of benign calibration scores; returns (threshold, measured FPR on the
    held-out benign scores, TPR on the attack scores); a score strictly above the threshold is flagged."""
    calib = benign_scores if calib is None else calib
    thr = float(np.quantile(calib, 1 - fpr, method="higher"))
    return thr, float(np.mean(benign_scores > thr)), float(np.mean(attack_scores > thr))
