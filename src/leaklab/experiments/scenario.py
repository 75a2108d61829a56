"""The victim side of embedding attacks: from a :class:`Scenario`, each attack's *case* builds the access it
grants (:mod:`leaklab.attacks.embedding.access`), the public data and the :class:`EmbedSecret` kept for scoring;
:func:`score_case` scores a prediction against that secret. Only the runner calls both: an attack never sees
the Scenario, the victim's encoder object or the private texts.

Cases (the registry entry's ``case``): ``inversion`` (leaked vectors + a black-box encoder, or the encoder's
weights where the entry ``needs`` them), ``nearest`` (plus half of the leaked documents as known candidates),
``alignment`` (leaked vectors and pairs of a secretly rotated victim + the attacker's local encoder),
``kb-extract`` and ``clustering`` (a search endpoint over a hidden index of private texts), ``membership``
(candidates: members and non-members in a seeded random order, and a search endpoint or a black-box
fine-tuned encoder).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leaklab.attacks.embedding.access import (
    Access,
    BlackBoxEncoder,
    EncoderWeights,
    LeakedPairs,
    LeakedVectors,
    Prediction,
    PublicData,
    SearchEndpoint,
)
from leaklab.attacks.embedding.registry import Scenario, examples, victim_targets
from leaklab.core import Config
from leaklab.core.registry import Entry
from leaklab.encoders import Encoder, TransformedEncoder, load_encoder, random_rotation, require_local
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import cosine_rows, membership_scores, score_inversion


@dataclass
class EmbedSecret:
    """What only the scorer holds: the private texts (in the victim's order), their vectors, the victim's
    encoder (the cosine of a re-embedded recovery), and per-case truth (presence, labels, document ids)."""

    texts: list[str]
    vectors: np.ndarray | None
    encoder: Encoder | None
    truth: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    """One attack's victim side: what it grants, the public data, the secret, and the scenario as recorded."""

    access: Access
    public: PublicData
    secret: EmbedSecret
    scenario: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)  # how the victim side was built (recorded with the flags)


def build_case(entry: Entry[Any], scn: Scenario, cfg: Config) -> Case:
    """The victim side of registered attack ``entry`` with options ``cfg`` on ``scn``."""
    name = entry.extra.get("case", "inversion")
    if name not in CASES:
        raise LeaklabError(f"embedding attack '{entry.name}' names an unknown case '{name}' (known: {sorted(CASES)})")
    return CASES[name][0](entry, scn, cfg)


def score_case(entry: Entry[Any], case: Case, pred: Prediction, cfg: Config) -> tuple[dict[str, Any], list]:
    """(metrics, example pairs) of ``pred`` against the case's secret."""
    return CASES[entry.extra.get("case", "inversion")][1](case, pred, cfg)


# ----------------------------------------------------------------------------- inversion of leaked vectors
def _inversion(entry: Entry[Any], scn: Scenario, cfg: Config) -> Case:
    """The private sample's vectors leak; the entry's ``needs`` grant a black-box encoder or the weights."""
    needs = entry.extra.get("needs", ("encoder",))
    local = require_local(scn.victim, entry.name) if "weights" in needs else None
    target_tokens = getattr(cfg, "target_max_tokens", None)
    sample, targets = victim_targets(scn, target_tokens(scn.max_tokens) if target_tokens else None)
    access = Access(  # granted after the victim embedded its texts: only the attack's passes are counted
        vectors=LeakedVectors(targets, scn.victim.name),
        encoder=BlackBoxEncoder(scn.victim) if "encoder" in needs else None,
        weights=EncoderWeights(local) if local is not None else None,
    )
    return Case(access, scn.public_data(), EmbedSecret(list(sample.texts), targets, scn.victim), scn.to_dict())


def _score_inversion(case: Case, pred: Prediction, cfg: Config) -> tuple[dict[str, Any], list]:
    s = case.secret
    metrics = score_inversion(pred.texts, s.texts, s.vectors, s.encoder)
    for name, texts in pred.variants.items():
        metrics[name] = _without_items(score_inversion(texts, s.texts, s.vectors, s.encoder))
    metrics.update(pred.measures)
    return metrics, examples(s.texts, pred.texts)


def _without_items(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k != "per_item_f1"}


# ----------------------------------------------------------------------------- nearest neighbour
def _nearest(entry: Entry[Any], scn: Scenario, cfg: Config) -> Case:
    """Half of the leaked documents (seeded) are among the attacker's candidates."""
    sample, targets = victim_targets(scn)
    present = np.random.default_rng(scn.seed).random(len(sample.texts)) < 0.5
    access = Access(
        vectors=LeakedVectors(targets, scn.victim.name),
        encoder=BlackBoxEncoder(scn.victim),
        hints={"known_documents": [t for t, p in zip(sample.texts, present, strict=True) if p]},
    )
    secret = EmbedSecret(list(sample.texts), targets, scn.victim, {"present": present})
    known = {"candidate_corpus": "public split + half of the leaked documents"}
    return Case(access, scn.public_data(), secret, scn.to_dict(), known)


def _score_nearest(case: Case, pred: Prediction, cfg: Config) -> tuple[dict[str, Any], list]:
    true, present = case.secret.texts, case.secret.truth["present"]
    flagged = np.asarray(pred.scores["declared_present"], dtype=bool)
    hit_at_k = [t in row for t, row in zip(true, pred.ranked or [], strict=True)]
    metrics: dict[str, Any] = {
        "present": int(present.sum()),
        "absent": int((~present).sum()),
        "detect_precision": float((flagged & present).sum() / max(flagged.sum(), 1)),
        "detect_recall": float((flagged & present).sum() / max(present.sum(), 1)),
        "exact_recovered_of_present": float(
            np.mean([r == t for r, t, p in zip(pred.texts, true, present, strict=True) if p] or [0.0])
        ),
        "recall_at_k_present": float(np.mean([h for h, p in zip(hit_at_k, present, strict=True) if p] or [0.0])),
        **pred.measures,
    }
    if present.any() and (~present).any():
        scores = membership_scores(pred.scores["best"], present.astype(int))
        metrics.update({f"presence_{k}": v for k, v in scores.items()})
    absent = ~present
    absent_scores = (
        score_inversion(
            [r for r, a in zip(pred.texts, absent, strict=True) if a],
            [t for t, a in zip(true, absent, strict=True) if a],
        )
        if absent.any()
        else {}
    )
    metrics["absent_nearest_token_f1"] = absent_scores.get("token_f1", 0.0)
    return metrics, examples(true, pred.texts)


# ----------------------------------------------------------------------------- known-plaintext alignment
def alignment_victim(scn: Scenario, cfg: Any) -> Encoder:
    """The victim behind a secret rotation (default) of the scenario's encoder, or another encoder."""
    base = load_encoder(cfg.victim, api_key=scn.api_key) if cfg.victim else scn.victim
    if cfg.transform == "none":
        return base
    return TransformedEncoder(
        base, random_rotation(base.dim, scn.seed + 1), cfg.noise, seed=scn.seed, name=f"{base.name}+secret-rotation"
    )


def _alignment(entry: Entry[Any], scn: Scenario, cfg: Any) -> Case:
    """Targets and k leaked pairs: private texts (the pairs disjoint from the targets) through the victim."""
    from leaklab.attacks.embedding.alignment import leaked_pairs
    from leaklab.corpora.sampling import eligible

    local = load_encoder(cfg.local or scn.encoder)
    victim = alignment_victim(scn, cfg)
    ks = cfg.ks
    available = len(eligible(scn.corpus_obj, scn.tokenizer, scn.min_tokens, scn.max_tokens, "private")) - scn.n
    if max(ks) > available:
        raise LeaklabError(
            f"k={max(ks)} leaked pairs requested but only {max(available, 0)} private texts "
            "besides the targets are available"
        )
    sample = scn.private(n=scn.n + max(ks))
    targets_text, pool = list(sample.texts[: scn.n]), sample.texts[scn.n :]
    targets = victim.embed(targets_text)
    texts, vecs = leaked_pairs(victim, pool, max(ks))  # what leaked; no attacker query
    access = Access(vectors=LeakedVectors(targets, victim.name), pairs=LeakedPairs(texts, vecs), reference=local)
    secret = EmbedSecret(targets_text, targets, victim, {"local": local})
    return Case(access, scn.public_data(), secret, scn.to_dict())


def _score_alignment(case: Case, pred: Prediction, cfg: Any) -> tuple[dict[str, Any], list]:
    s = case.secret
    local = s.truth["local"]
    before = local.usage.snapshot()
    true_local = local.embed(s.texts)
    local.usage.queries, local.usage.calls, local.usage.tokens = before.queries, before.calls, before.tokens
    rows = []
    for key, mapped in pred.vectors.items():
        row: dict[str, Any] = {
            "k": int(key.removeprefix("k=")),
            "mapped_cosine": float(cosine_rows(mapped, true_local).mean()),
        }
        for name, texts in pred.variants.items():
            at, _, inner = name.partition("/")
            if at == key:
                row[inner] = _without_items(score_inversion(texts, s.texts, s.vectors, s.encoder))
        rows.append(row)
    m = pred.measures
    return {"method": m.get("method"), "sweep": rows, "victim": m.get("victim"), "local": m.get("local")}, []


# ----------------------------------------------------------------------------- search over a hidden index
def _kb_secrets(entry: Entry[Any], scn: Scenario, cfg: Any) -> Case:
    """A KB of private texts with planted secret records, searched through the API view the options name
    (scores, ids only, noised or quantised); option ``encoder_known`` also grants the index encoder's weights."""
    from leaklab.attacks.embedding.kb import HiddenKB
    from leaklab.attacks.embedding.kbsecrets import LocalSearch, victim_kb

    kb = victim_kb(scn, cfg)
    index = HiddenKB(kb.docs, scn.victim, ids=kb.ids, max_top_k=max(cfg.top_k, 100))
    weights = None
    if cfg.encoder_known:
        weights = EncoderWeights(require_local(load_encoder(scn.encoder, fresh=True), "kb-secrets (encoder_known)"))
    access = Access(search=LocalSearch(index, cfg.view(), seed=scn.seed), weights=weights)  # type: ignore[arg-type]
    secret = EmbedSecret(list(kb.docs), None, None, {"planted": kb})
    return Case(access, scn.public_data(), secret, scn.to_dict())


def _score_kb_secrets(case: Case, pred: Prediction, cfg: Any) -> tuple[dict[str, Any], list]:
    from leaklab.attacks.embedding.kbsecrets import score_values

    kb = case.secret.truth["planted"]
    metrics = score_values(kb, pred.info["guesses"], cfg.parsed())
    per_secret = metrics.pop("per_secret")
    queries, requests = case.access.search.queries, case.access.search.calls
    metrics.update(
        {
            "kb_docs": len(kb.docs),
            "queries_total": queries,
            "requests_total": requests,
            "queries_per_secret": queries / len(kb.secrets),
            **pred.measures,
        }
    )
    pred_of = dict(zip(pred.ids or [], pred.texts, strict=True))
    pairs = [
        {"true_text": kb.docs[kb.ids.index(r["doc_id"])], "pred_text": pred_of.get(r["doc_id"], "")}
        for r in per_secret[:5]
    ]
    return metrics, pairs


def _kb_extract(entry: Entry[Any], scn: Scenario, cfg: Any) -> Case:
    """A search over the private texts; option ``encoder_known`` also grants the index encoder's weights."""
    from leaklab.attacks.embedding.kb import HiddenKB

    sample = scn.private()
    kb = HiddenKB(sample.texts, scn.victim, max_top_k=cfg.max_top_k)
    weights = None
    if cfg.encoder_known:
        local = require_local(load_encoder(scn.encoder, fresh=True), "kb-extract (encoder_known)")
        weights = EncoderWeights(local)
    access = Access(search=SearchEndpoint(kb), weights=weights)
    secret = EmbedSecret([kb.text_of(i) for i in kb.ids], kb.matrix, scn.victim, {"ids": kb.ids})
    return Case(access, scn.public_data(), secret, scn.to_dict())


def _score_kb_extract(case: Case, pred: Prediction, cfg: Any) -> tuple[dict[str, Any], list]:
    s, ids = case.secret, case.secret.truth["ids"]
    pred_of = dict(zip(pred.ids or [], pred.texts, strict=True))
    texts = [pred_of.get(i, "") for i in ids]
    metrics = score_inversion(texts, s.texts, s.vectors, s.encoder)
    f1 = np.array(metrics["per_item_f1"])
    queries = case.access.need("search").queries
    metrics.update(
        {
            "docs": len(ids),
            "discovered": len(pred_of),
            "recovered_share": float((f1 >= cfg.recovered_f1).mean()),
            "recovered_f1_threshold": cfg.recovered_f1,
            "queries_total": queries,
            "queries_per_doc": queries / len(ids),
            **pred.measures,
        }
    )
    found = [d for d in pred.vectors if d in ids]
    if cfg.encoder_known:
        vecs = np.stack([pred.vectors[d] for d in found]) if found else None
        true = s.vectors[[ids.index(d) for d in found]] if found else None
        metrics["vector_cosine"] = float(cosine_rows(vecs, true).mean()) if found else 0.0
        metrics["vector_cosine_min"] = float(cosine_rows(vecs, true).min()) if found else 0.0
    return metrics, examples(s.texts, texts)


def _clustering(entry: Entry[Any], scn: Scenario, cfg: Any) -> Case:
    """A search over private documents of a labelled corpus; the number of topics among them is granted."""
    from leaklab.attacks.embedding.kb import HiddenKB
    from leaklab.corpora import load_corpus

    sub = Scenario(scn.encoder, cfg.kb_corpus, scn.n, scn.seed, scn.min_tokens, cfg.kb_max_tokens, api_key=scn.api_key)
    sub.victim = scn.victim  # same encoder object
    sub.corpus_obj = load_corpus(cfg.kb_corpus)
    sample = sub.private()
    kb = HiddenKB(sample.texts, scn.victim, max_top_k=100)
    access = Access(
        search=SearchEndpoint(kb), encoder=BlackBoxEncoder(scn.victim), hints={"topics": len(set(sample.labels))}
    )
    truth = {"ids": kb.ids, "labels": np.array(sample.labels), "label_names": sub.corpus_obj.label_names}
    secret = EmbedSecret(list(sample.texts), None, scn.victim, truth)
    oracle = {"oracle": "k-means on the true document vectors (upper bound, not an attack)"}
    return Case(access, sub.public_data(), secret, scn.to_dict() | {"kb_corpus": cfg.kb_corpus}, oracle)


def _score_clustering(case: Case, pred: Prediction, cfg: Any) -> tuple[dict[str, Any], list]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    s = case.secret
    labels_true, pos = s.truth["labels"], {d: i for i, d in enumerate(s.truth["ids"])}
    idx = np.array([pos[d] for d in pred.ids or []])
    labels = np.asarray(pred.labels)
    k = pred.measures["clusters"]
    before = s.encoder.usage.snapshot()
    true_vecs = s.encoder.embed(s.texts)
    s.encoder.usage.queries, s.encoder.usage.calls, s.encoder.usage.tokens = before.queries, before.calls, before.tokens
    oracle = KMeans(k, n_init=10, random_state=case.public.seed).fit_predict(true_vecs)
    names = s.truth["label_names"]
    metrics = {
        "docs": len(s.texts),
        "docs_retrieved": len(idx),
        "clusters": k,
        "nmi": float(normalized_mutual_info_score(labels_true[idx], labels)),
        "ari": float(adjusted_rand_score(labels_true[idx], labels)),
        "oracle_nmi": float(normalized_mutual_info_score(labels_true, oracle)),
        "representation_cosine": float(cosine_rows(pred.vectors["representations"], true_vecs[idx]).mean()),
        "keywords": pred.measures.get("keywords", {}),
        "true_topics": {
            str(c): Counter(names[labels_true[i]] for i in idx[labels == c]).most_common(1)[0][0]
            for c in range(k)
            if (labels == c).any()
        },
    }
    return metrics, []


# ----------------------------------------------------------------------------- membership
def membership_split(scn: Scenario) -> tuple[list[str], list[str]]:
    """Members and non-members: one seeded random halving of 2n private texts."""
    texts = scn.private(n=2 * scn.n).texts
    return list(texts[: scn.n]), list(texts[scn.n :])


def _membership(entry: Entry[Any], scn: Scenario, cfg: Any) -> Case:
    """Members and non-members: one seeded random halving of 2n private texts, handed over shuffled; the
    members are indexed (``target=kb``) or fine-tune a copy of the encoder (``target=encoder``)."""
    members, non = membership_split(scn)
    order = np.random.default_rng(scn.seed + 1).permutation(len(members) + len(non))
    candidates = [(members + non)[i] for i in order]
    labels = (np.arange(len(members) + len(non)) < len(members)).astype(int)[order]
    if cfg.target == "kb":
        from leaklab.attacks.embedding.kb import HiddenKB

        kb = HiddenKB(members, scn.victim, max_top_k=10)
        access = Access(search=SearchEndpoint(kb), hints={"candidates": candidates})
        truth: dict[str, Any] = {"labels": labels}
    else:
        from leaklab.attacks.embedding.membership import finetune_simcse

        base = require_local(load_encoder(scn.encoder), "membership --target encoder")
        tuned = finetune_simcse(base, members, epochs=cfg.epochs, lr=cfg.lr, seed=scn.seed)
        access = Access(encoder=BlackBoxEncoder(tuned), reference=base, hints={"candidates": candidates})
        truth = {"labels": labels, "finetune": {"members": len(members), "epochs": cfg.epochs, "objective": "SimCSE"}}
    secret = EmbedSecret(candidates, None, scn.victim, truth)
    split = {"split": "random halving of private texts (same distribution), candidates shuffled"}
    return Case(access, scn.public_data(), secret, scn.to_dict(), split)


def _score_membership(case: Case, pred: Prediction, cfg: Any) -> tuple[dict[str, Any], list]:
    labels = case.secret.truth["labels"]
    metrics: dict[str, Any] = {name: membership_scores(s, labels) for name, s in pred.scores.items()}
    if "finetune" in case.secret.truth:
        metrics["finetune"] = case.secret.truth["finetune"]
    return metrics, []


Builder = Callable[[Entry[Any], Scenario, Any], Case]
Scorer = Callable[[Case, Prediction, Any], tuple[dict[str, Any], list]]

#: case name -> (victim side, scorer)
CASES: dict[str, tuple[Builder, Scorer]] = {
    "inversion": (_inversion, _score_inversion),
    "nearest": (_nearest, _score_nearest),
    "alignment": (_alignment, _score_alignment),
    "kb-extract": (_kb_extract, _score_kb_extract),
    "kb-secrets": (_kb_secrets, _score_kb_secrets),
    "clustering": (_clustering, _score_clustering),
    "membership": (_membership, _score_membership),
}
