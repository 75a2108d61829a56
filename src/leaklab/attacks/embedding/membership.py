"""Membership inference: was a text indexed in a knowledge base, or in an encoder's fine-tuning data?

Members and non-members are one random split of the same private sample (no domain or time shift).

- knowledge base: score(x) = top-1 similarity returned for the query x (also for a perturbed x with 20% of its
  words dropped, which a near-exact-match filter would not catch).
- encoder fine-tuning: the victim fine-tunes a copy of the encoder on the members (SimCSE: two dropout views,
  InfoNCE at τ=0.05). The attacker, with black-box access to the fine-tuned encoder and the public base model as
  reference, scores s(x) = mean_a cos(φ_ft(x), φ_ft(a(x))) − mean_a cos(φ_0(x), φ_0(a(x))) over word-drop views a.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from leaklab.attacks.embedding.kb import HiddenKB, SearchIndex
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, AttackReport, Scenario
from leaklab.core import Config, option
from leaklab.encoders import Encoder, LocalEncoder, check_texts, load_encoder, require_local
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import cosine_rows, membership_scores


def drop_words(text: str, share: float, rng: np.random.Generator) -> str:
    """Delete round(share·n) random words (at least one kept)."""
    w = text.split()
    k = min(len(w) - 1, round(share * len(w)))
    if k <= 0:
        return text
    drop = set(rng.choice(len(w), size=k, replace=False).tolist())
    return " ".join(x for i, x in enumerate(w) if i not in drop)


def kb_scores(kb: SearchIndex, texts: Sequence[str]) -> np.ndarray:
    """Top-1 similarity the search returns for each text."""
    hits = kb.search(list(texts), 1)
    return np.array([row[0][1] if row else -1.0 for row in hits])


def augmentation_consistency(
    encoder: Encoder, texts: Sequence[str], views: int = 3, share: float = 0.2, seed: int = 0
) -> np.ndarray:
    """mean_a cos(φ(x), φ(a(x))) over ``views`` word-drop views per text (black-box queries)."""
    rng = np.random.default_rng(seed)
    texts = check_texts(texts, "membership candidates")
    aug = [drop_words(t, share, rng) for t in texts for _ in range(views)]
    base = np.repeat(encoder.embed(texts), views, 0)
    return cosine_rows(base, encoder.embed(aug)).reshape(len(texts), views).mean(1)


def finetune_simcse(
    encoder: LocalEncoder,
    texts: Sequence[str],
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 3e-5,
    temperature: float = 0.05,
    seed: int = 0,
) -> LocalEncoder:
    """A copy of ``encoder`` fine-tuned with unsupervised SimCSE (InfoNCE over two dropout views)."""
    texts = check_texts(texts, "fine-tuning set")
    if len(texts) < 2:
        raise LeaklabError("fine-tuning needs at least two texts")
    torch.manual_seed(seed)
    backbone = copy.deepcopy(encoder.backbone)
    tuned = LocalEncoder(
        f"{encoder.name}+simcse-s{seed}-{len(texts)}",
        backbone,
        encoder.tokenizer,
        encoder.pooling,
        encoder.normalize,
        encoder.max_length,
    )
    for p in backbone.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(backbone.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    backbone.train()
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for i in range(0, len(order), batch_size):
            batch = [texts[j] for j in order[i : i + batch_size]]
            if len(batch) < 2:
                continue
            enc = encoder.tokenizer(
                batch, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="pt"
            )
            a = tuned.forward_ids(enc["input_ids"], enc["attention_mask"])
            b = tuned.forward_ids(enc["input_ids"], enc["attention_mask"])
            logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
            loss = torch.nn.functional.cross_entropy(logits / temperature, torch.arange(len(batch)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return tuned


def _split(scn: Scenario, n: int) -> tuple[list[str], list[str]]:
    """Members and non-members: one seeded random halving of 2n private texts."""
    texts = scn.private(n=2 * n).texts
    return texts[:n], texts[n:]


@dataclass(frozen=True)
class MembershipConfig(Config):
    """Options of the membership attack."""

    target: Literal["kb", "encoder"] = option("kb", "membership of the indexed knowledge base or of fine-tuning")
    epochs: int = option(3, "target=encoder: SimCSE fine-tuning epochs of the victim's encoder")
    lr: float = option(3e-5, "target=encoder: fine-tuning learning rate")
    views: int = option(3, "target=encoder: word-drop views per text of the consistency score")


ACCESS = "search endpoint (kb) or black-box embed of the fine-tuned encoder + public base (encoder)"


@EMBED_ATTACKS.register("membership", config=MembershipConfig, access=ACCESS)
def evaluate(scn: Scenario, cfg: MembershipConfig) -> AttackReport:
    """Was a text in the indexed knowledge base or the encoder's fine-tuning data."""
    return _evaluate_kb(scn) if cfg.target == "kb" else _evaluate_encoder(scn, cfg)


def _evaluate_kb(scn: Scenario) -> AttackReport:
    members, non = _split(scn, scn.n)
    kb = HiddenKB(members, scn.victim, max_top_k=10)
    before = scn.victim.usage.snapshot()
    candidates = members + non
    labels = np.array([1] * len(members) + [0] * len(non))
    rng = np.random.default_rng(scn.seed)
    exact = kb_scores(kb, candidates)
    perturbed = kb_scores(kb, [drop_words(t, 0.2, rng) for t in candidates])
    metrics = {
        "exact_query": membership_scores(exact, labels),
        "perturbed_query": membership_scores(perturbed, labels),
    }
    usage = scn.victim.usage.since(before) | {"search_queries": kb.queries}
    return AttackReport(
        "membership",
        scn.to_dict(),
        metrics,
        usage,
        {"target": "kb", "split": "random halving of private texts (same distribution)"},
    )


def _evaluate_encoder(scn: Scenario, cfg: MembershipConfig) -> AttackReport:
    base = require_local(load_encoder(scn.encoder), "membership --target encoder")
    members, non = _split(scn, scn.n)
    tuned = finetune_simcse(base, members, epochs=cfg.epochs, lr=cfg.lr, seed=scn.seed)
    candidates = members + non
    labels = np.array([1] * len(members) + [0] * len(non))
    ft = augmentation_consistency(tuned, candidates, cfg.views, seed=scn.seed)
    ref = augmentation_consistency(base, candidates, cfg.views, seed=scn.seed)
    drift = cosine_rows(tuned.embed(candidates), base.embed(candidates))
    metrics = {
        "consistency_ref": membership_scores(ft - ref, labels),
        "consistency": membership_scores(ft, labels),
        "drift_from_base": membership_scores(-drift, labels),
        "finetune": {"members": len(members), "epochs": cfg.epochs, "objective": "SimCSE"},
    }
    return AttackReport(
        "membership",
        scn.to_dict(),
        metrics,
        dict(tuned.usage.__dict__),
        {
            "target": "encoder",
            "reference": f"public base model {base.name}",
            "split": "random halving of private texts (same distribution)",
        },
    )
