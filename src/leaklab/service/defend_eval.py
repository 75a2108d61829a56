"""Privacy–utility curves of the API defenses against an adaptive attacker.

Threat model: the victim stores or shares vectors the API returned under the victim's tenant; those
leak. The attacker holds an API key of its own (its own tenant) and public text (the "public" split), so
it trains on vectors defended exactly as the API defends them (adaptive: retrained per defense, fresh noise).
Extra knowledge is an explicit grant: ``known_pairs`` = victim-tenant (text, vector) pairs the attacker holds
(the attacks map the victim's space onto their own with an orthogonal map fitted on them, kept when it beats
the identity on held-out pairs: the known-plaintext break of rotation); the victim's documents are among the
attacker's candidate texts (dictionary attack).

Attacks: the registered ``bow`` and ``nearest`` embedding attacks with their typed options, run by the
runner (:func:`leaklab.experiments.runner.attack_embedding`) on an access object built here (the victim's
defended vectors, a counting black-box encoder that is the attacker's own tenant of the defended API, the known
pairs, the candidate documents): the bag-of-words inverter's token F1 on the victim's texts, and
nearest-neighbour re-identification (top-1 over the candidates). Utility: label precision@10 and neighbour
recall@10 (top-10 overlap with the undefended ranking) among the victim's own defended vectors, and cosine to
the clean vector where defined.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from leaklab.attacks.embedding.access import Access, BlackBoxEncoder, LeakedPairs, LeakedVectors, PublicData
from leaklab.attacks.embedding.bow import BowConfig
from leaklab.attacks.embedding.nearest import NearestConfig
from leaklab.corpora.sampling import split_of
from leaklab.encoders import CallableEncoder
from leaklab.errors import LeaklabError
from leaklab.experiments.runner import attack_embedding, outcome_of, record_outcome
from leaklab.experiments.scenario import Case, EmbedSecret
from leaklab.metrics.embedding import word_prf, words
from leaklab.service.defenses import Pipeline, make_pipeline

ROTATION_SECRET = "defend-eval-secret-0123456789"
VICTIM, ATTACKER = "victim", "attacker"
ATTACK_METRICS = ("bow_token_f1", "nn_reidentification")
#: the bag-of-words attacker's options: no augmented training copies (each would be a defended API query), the
#: 2000 most frequent public words, and the held-out-threshold decoding (the forward dictionary and per-vector
#: NNLS of the ef1 decoding are too slow for a sweep that retrains the attacker at every point)
BOW_OPTIONS = BowConfig(augment=0, decode="threshold", vocab=2000)


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
    corpus: str = ""
    embed: Callable[[list[str]], np.ndarray] | None = field(default=None, repr=False)

    def clean(self, texts: list[str]) -> np.ndarray:
        """Undefended vectors of ``texts`` (those already embedded are looked up, others embedded)."""
        known = dict(zip(self.victim_texts, self.victim_clean, strict=True))
        known.update(zip(self.public_texts, self.public_clean, strict=True))
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            if self.embed is None:
                raise LeaklabError(f"{len(missing)} texts have no clean vector and no encoder embeds them")
            known.update(zip(missing, self.embed(missing), strict=True))
        return np.stack([known[t] for t in texts]).astype(np.float32)


def prepare(
    embed: Callable[[list[str]], np.ndarray],
    corpus: str,
    n_victim: int,
    n_public: int,
    seed: int,
    vocab_size: int = 2000,
) -> EvalData:
    """Victim documents from the private split, attacker texts from the public split, both embedded clean;
    ``vocab``: the public texts' most frequent words (the no-vector prior's guesses)."""
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
    counts = Counter(w for t in pt for w in words(t))
    vocab = [w for w, _ in counts.most_common(vocab_size)]
    labels = np.array([c.labels[i] for i in vi])
    return EvalData(vt, labels, embed(vt), pt, embed(pt), vocab, corpus, embed)


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


def attacker_case(
    data: EvalData, pipe: Pipeline, victim: np.ndarray, pairs: LeakedPairs | None, rng: np.random.Generator
) -> Case:
    """The victim side of one defense point: the leaked (victim-tenant) vectors, the attacker's own tenant of
    the defended API as a counting black-box encoder, the known pairs, the victim's documents as known
    candidates, the attacker's public texts; the victim's texts stay in the secret."""
    dim = pipe.apply(data.victim_clean[:1], ATTACKER, np.random.default_rng(0)).shape[1]
    api = CallableEncoder(lambda texts: pipe.apply(data.clean(texts), ATTACKER, rng), dim, "defended-api", None)
    access = Access(
        vectors=LeakedVectors(victim, api.name),
        encoder=BlackBoxEncoder(api),
        pairs=pairs,
        hints={"known_documents": list(data.victim_texts)},
    )
    public = PublicData(data.corpus, None, 0, 1, 10**6, tuple(data.public_texts))
    truth = {"present": np.ones(len(data.victim_texts), dtype=bool)}
    secret = EmbedSecret(list(data.victim_texts), None, None, truth)
    return Case(access, public, secret, {"corpus": data.corpus, "defense": pipe.describe()})


def _attack(data: EvalData, pipe: Pipeline, known_pairs: int, rng: np.random.Generator, victim: np.ndarray) -> dict:
    """The registered bow and nearest attacks of the attacker (its own tenant) on the leaked vectors."""
    if known_pairs > len(data.public_texts):
        raise LeaklabError(f"{known_pairs} known pairs asked for, but the attacker has {len(data.public_texts)} texts")
    pairs = None
    if known_pairs:
        idx = rng.choice(len(data.public_texts), size=known_pairs, replace=False)
        texts = [data.public_texts[i] for i in idx]
        pairs = LeakedPairs(texts, pipe.apply(data.public_clean[idx], VICTIM, rng))
    bow = attack_embedding("bow", attacker_case(data, pipe, victim, pairs, rng), BOW_OPTIONS)
    nn_options = NearestConfig(candidates=len(data.public_texts), k=1)
    nn = attack_embedding("nearest", attacker_case(data, pipe, victim, pairs, rng), nn_options)
    return {"bow_token_f1": bow.metrics["token_f1"], "nn_reidentification": nn.metrics["exact_recovered_of_present"]}


def prior_f1(data: EvalData) -> float:
    """Token F1 (as the bow attack is scored) of guessing the attacker's most frequent public words for every
    text (no vector used)."""
    best = 0.0
    for m in (1, 2, 3, 5, 8, 12):
        guess = " ".join(data.vocab[:m])
        best = max(best, float(np.mean([word_prf(guess, t)[2] for t in data.victim_texts])))
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
