"""Privacy–utility curves of the API defenses against an adaptive attacker.

Threat model: the victim stores or shares vectors the API returned under the victim's tenant; those
leak. The attacker holds an API key of its own (its own tenant) and public text (the "public" split), so
it trains its probes on vectors defended exactly as the API defends them (adaptive: retrained per defense,
fresh noise). Extra knowledge is an explicit flag: ``known_pairs`` = victim-tenant (text, vector) pairs
the attacker holds (used to fit an orthogonal map from the victim's space to its own: the known-plaintext
break of rotation); the victim's documents are among the attacker's candidate texts (dictionary attack).

Attacks: a bag-of-words probe (ridge from vector to content-word multi-hot; top-m words, m tuned on the
attacker's own held-out data) scored by token F1 on the victim's texts, and nearest-neighbour
re-identification (top-1 over a candidate pool). Utility: label precision@10 and neighbour recall@10
(top-10 overlap with the undefended ranking) among the victim's own defended vectors, and cosine to the
clean vector where defined.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import orthogonal_procrustes

from leaklab.corpora.sampling import split_of
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import outcome_of, record_outcome
from leaklab.service.defenses import Pipeline, make_pipeline
from leaklab.service.monitor import STOPWORDS

ROTATION_SECRET = "defend-eval-secret-0123456789"
VICTIM, ATTACKER = "victim", "attacker"
ATTACK_METRICS = ("bow_token_f1", "nn_reidentification", "bow_words_per_text")


def default_sweep() -> list[tuple[str, float | str, list[dict]]]:
    """(family, parameter, defense specs): the curves drawn by default."""
    sweep: list[tuple[str, float | str, list[dict]]] = [("none", 0, [])]
    sweep += [
        ("gaussian", e, [{"kind": "gaussian", "epsilon": e, "delta": 1e-5}]) for e in (100, 300, 1000, 3000, 10000)
    ]
    sweep += [("metric-dp", e, [{"kind": "metric-dp", "epsilon": e}]) for e in (100, 200, 400, 800, 1600, 3200)]
    sweep += [("quantise", b, [{"kind": "quantise", "bits": b, "clip": 0.25}]) for b in (1, 2, 3, 4, 8)]
    sweep += [("truncate", d, [{"kind": "truncate", "dims": d}]) for d in (4, 8, 16, 32, 64, 128)]
    sweep += [("rotate", "secret", [{"kind": "rotate", "secret": ROTATION_SECRET}])]
    return sweep


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS and len(w) > 2}


@dataclass
class BowProbe:
    """Ridge map vector -> content-word indicators; predicts each text's top-m words."""

    vocab: list[str]
    w: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m: int = 5

    def _targets(self, texts: list[str]) -> np.ndarray:
        index = {w: i for i, w in enumerate(self.vocab)}
        y = np.zeros((len(texts), len(self.vocab)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in content_words(t):
                if w in index:
                    y[r, index[w]] = 1
        return y

    def fit(self, x: np.ndarray, texts: list[str], lam: float = 1.0) -> BowProbe:
        """W = (XᵀX + λI)⁻¹ XᵀY on 80% of the data; m maximises token F1 on the other 20%."""
        n = len(x)
        cut = int(n * 0.8)
        xb = np.hstack([x, np.ones((n, 1), dtype=x.dtype)])
        y = self._targets(texts)
        a = xb[:cut].T @ xb[:cut] + lam * np.eye(xb.shape[1])
        self.w = np.linalg.solve(a, xb[:cut].T @ y[:cut])
        self.m = max((token_f1(self._predict(x[cut:], m), texts[cut:]), m) for m in (1, 2, 3, 5, 8, 12))[1]
        a = xb.T @ xb + lam * np.eye(xb.shape[1])
        self.w = np.linalg.solve(a, xb.T @ y)
        return self

    def _predict(self, x: np.ndarray, m: int) -> list[set[str]]:
        scores = np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)]) @ self.w
        top = np.argsort(-scores, axis=1)[:, :m]
        return [{self.vocab[j] for j in row} for row in top]

    def predict(self, x: np.ndarray) -> list[set[str]]:
        return self._predict(x, self.m)


def token_f1(pred: list[set[str]], texts: list[str]) -> float:
    """Mean over texts of the F1 between predicted and true content-word sets."""
    scores = []
    for p, t in zip(pred, texts, strict=True):
        true = content_words(t)
        hit = len(p & true)
        scores.append(0.0 if not hit else 2 * hit / (len(p) + len(true)))
    return float(np.mean(scores))


def topk_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :k]


def utility(defended: np.ndarray, clean: np.ndarray, labels: np.ndarray, clean_nn: np.ndarray, k: int = 10) -> dict:
    nn = topk_neighbours(defended, k)
    label_p = float(np.mean(labels[nn] == labels[:, None]))
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nn, clean_nn, strict=True)]))
    cos = float(np.mean(np.sum(defended * clean, axis=1))) if defended.shape == clean.shape else float("nan")
    return {"label_precision@10": label_p, "neighbour_recall@10": recall, "cosine_to_clean": cos}


@dataclass
class EvalData:
    victim_texts: list[str]
    victim_labels: np.ndarray
    victim_clean: np.ndarray
    public_texts: list[str]
    public_clean: np.ndarray
    vocab: list[str]


def prepare(
    embed: Callable[[list[str]], np.ndarray],
    corpus: str,
    n_victim: int,
    n_public: int,
    seed: int,
    vocab_size: int = 2000,
) -> EvalData:
    """Victim documents from the private split, attacker texts from the public split, both embedded clean."""
    from leaklab.corpora import load_corpus

    c = load_corpus(corpus)
    rng = np.random.default_rng(seed)
    priv = [i for i, t in enumerate(c.texts) if split_of(t) == "private"]
    pub = [i for i, t in enumerate(c.texts) if split_of(t) == "public"]
    if len(priv) < n_victim or len(pub) < n_public:
        raise LeaklabError(
            f"corpus '{corpus}' has {len(priv)} private / {len(pub)} public texts; asked for {n_victim} / {n_public}"
        )
    vi = sorted(rng.choice(priv, n_victim, replace=False))
    pi = sorted(rng.choice(pub, n_public, replace=False))
    vt, pt = [c.texts[i] for i in vi], [c.texts[i] for i in pi]
    counts = Counter(w for t in pt for w in content_words(t))
    vocab = [w for w, _ in counts.most_common(vocab_size)]
    return EvalData(vt, np.array([c.labels[i] for i in vi]), embed(vt), pt, embed(pt), vocab)


def _align(victim_pairs: np.ndarray, attacker_pairs: np.ndarray) -> np.ndarray:
    r, _ = orthogonal_procrustes(victim_pairs, attacker_pairs)
    return r


def evaluate_point(
    data: EvalData, pipe: Pipeline, known_pairs: int, rng: np.random.Generator, clean_nn: np.ndarray
) -> dict:
    """One defense: utility for the victim, and the adaptive attacker's outcome (the runner's: "recovered" with
    its success, or "could_not_run" with the reason and no success values, never 0)."""
    victim = pipe.apply(data.victim_clean, VICTIM, rng)
    where = f"adaptive attacker on '{pipe.describe()}' with {known_pairs} known pairs"
    status, reason, success = outcome_of(where, lambda: _attack(data, pipe, known_pairs, rng, victim))
    return {
        **utility(victim, data.victim_clean, data.victim_labels, clean_nn),
        "status": status,
        "reason": reason,
        **(success or dict.fromkeys(ATTACK_METRICS)),
    }


def _attack(data: EvalData, pipe: Pipeline, known_pairs: int, rng: np.random.Generator, victim: np.ndarray) -> dict:
    """BoW probe token F1 and NN re-identification of the attacker (its own tenant) on the leaked vectors."""
    if known_pairs > len(data.public_texts):
        raise LeaklabError(f"{known_pairs} known pairs asked for, but the attacker has {len(data.public_texts)} texts")
    attacker_train = pipe.apply(data.public_clean, ATTACKER, rng)
    leaked = victim
    if known_pairs:
        # the attacker holds victim-tenant vectors of `known_pairs` public texts and re-embeds them itself; it
        # keeps the orthogonal map only if it beats the identity on half of those pairs held out
        idx = rng.choice(len(data.public_texts), size=known_pairs, replace=False)
        v_pairs = pipe.apply(data.public_clean[idx], VICTIM, rng)
        a_pairs = attacker_train[idx]
        half = known_pairs // 2
        r = _align(v_pairs[:half], a_pairs[:half])
        if np.linalg.norm(v_pairs[half:] @ r - a_pairs[half:]) < np.linalg.norm(v_pairs[half:] - a_pairs[half:]):
            leaked = victim @ _align(v_pairs, a_pairs)
    probe = BowProbe(data.vocab).fit(attacker_train, data.public_texts)
    f1 = token_f1(probe.predict(leaked), data.victim_texts)
    pool = np.vstack([pipe.apply(data.victim_clean, ATTACKER, rng), attacker_train])  # victim docs are candidates
    hits = np.argmax(leaked @ pool.T, axis=1) == np.arange(len(leaked))
    return {"bow_token_f1": f1, "nn_reidentification": float(hits.mean()), "bow_words_per_text": probe.m}


def prior_f1(data: EvalData) -> float:
    """Token F1 of guessing the attacker's most frequent content words for every text (no vector used)."""
    best = 0.0
    for m in (1, 2, 3, 5, 8, 12):
        guess = set(data.vocab[:m])
        best = max(best, token_f1([guess] * len(data.victim_texts), data.victim_texts))
    return best


def run_sweep(
    data: EvalData,
    sweep: list[tuple[str, float | str, list[dict]]],
    seed: int,
    known_pairs: tuple[int, ...] = (0,),
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Evaluate every (defense, known-pairs) point of the sweep."""
    clean_nn = topk_neighbours(data.victim_clean, 10)
    rows = []
    for family, param, specs in sweep:
        pipe = make_pipeline(specs)
        for k in known_pairs:
            if progress:
                progress(f"{pipe.describe()} known_pairs={k}")
            row = evaluate_point(data, pipe, k, np.random.default_rng(seed), clean_nn)
            rows.append({"family": family, "param": param, "defense": pipe.describe(), "known_pairs": k, **row})
    return rows


def plot_curves(rows: list[dict], prior: float, path, title: str) -> None:
    """Two panels: attack success (BoW token F1; NN re-identification) against label precision@10; a point whose
    attacker could not run is a black ✕ on the bottom edge at its utility (n/a, not 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = {fam: plt.get_cmap("tab10")(i) for i, fam in enumerate(families)}
    panels = (
        (axes[0], "bow_token_f1", "BoW probe token F1 (adaptive)"),
        (axes[1], "nn_reidentification", "NN re-identification (top-1)"),
    )
    failed = [r for r in rows if r.get("status", "recovered") != "recovered"]
    for ax, metric, name in panels:
        for fam in families:
            for k in sorted({r["known_pairs"] for r in rows}):
                pts = [r for r in rows if r["family"] == fam and r["known_pairs"] == k and r not in failed]
                if not pts:
                    continue
                style = ("o-" if len(pts) > 1 else "s") if k == 0 else ("x--" if len(pts) > 1 else "X")
                label = fam if k == 0 else f"{fam} +{k} known pairs"
                xs, ys = [p["label_precision@10"] for p in pts], [p[metric] for p in pts]
                ax.plot(xs, ys, style, color=colours[fam], label=label, alpha=0.8, ms=7 if k == 0 else 9)
        if failed:
            xs = [r["label_precision@10"] for r in failed]
            ax.plot(xs, [0.02] * len(xs), "x", color="black", ms=10, mew=2, transform=ax.get_xaxis_transform())
            ax.plot([], [], "x", color="black", label="n/a: attacker could not run")
        if metric == "bow_token_f1":
            ax.axhline(prior, color="grey", ls=":", label="prior (no vector)")
        ax.set_xlabel("utility: label precision@10 (victim's retrieval)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_md(rows: list[dict]) -> str:
    head = (
        "| defense | known pairs | label P@10 | neighbour R@10 | cos to clean | BoW token F1 | NN re-id |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['defense']} | {r['known_pairs']} | {r['label_precision@10']:.3f} | "
        f"{r['neighbour_recall@10']:.3f} | "
        f"{r['cosine_to_clean']:.3f} | {_attack_cells(r)} |\n"
        for r in rows
    )
    return head + body


def _attack_cells(row: dict) -> str:
    """The BoW and NN cells of a table row: the values, or n/a with the reason when the attacker could not run."""
    if row.get("status", "recovered") == "recovered":
        return f"{row['bow_token_f1']:.3f} | {row['nn_reidentification']:.3f}"
    return f"{record_outcome(row)} | n/a"
