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

from leaklab.attacks.base import CannotRun
from leaklab.attacks.embedding.access import Access, Prediction, PublicData, SearchEndpoint
from leaklab.attacks.embedding.registry import EMBED_ATTACKS
from leaklab.core import Config, option
from leaklab.encoders import Encoder, LocalEncoder, check_texts
from leaklab.errors import LeaklabError
from leaklab.metrics.embedding import cosine_rows


def drop_words(text: str, share: float, rng: np.random.Generator) -> str:
    """Delete round(share·n) random words (at least one kept)."""
    w = text.split()
    k = min(len(w) - 1, round(share * len(w)))
    if k <= 0:
        return text
    drop = set(rng.choice(len(w), size=k, replace=False).tolist())
    return " ".join(x for i, x in enumerate(w) if i not in drop)


def kb_scores(kb: SearchEndpoint, texts: Sequence[str]) -> np.ndarray:
    """Top-1 similarity the search returns for each text."""
    hits = kb.hits(list(texts), 1)
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


@dataclass(frozen=True)
class MembershipConfig(Config):
    """Options of the membership attack."""

    target: Literal["kb", "encoder"] = option("kb", "membership of the indexed knowledge base or of fine-tuning")
    epochs: int = option(3, "target=encoder: SimCSE fine-tuning epochs of the victim's encoder")
    lr: float = option(3e-5, "target=encoder: fine-tuning learning rate")
    views: int = option(3, "target=encoder: word-drop views per text of the consistency score")


ACCESS = "search endpoint (kb) or black-box embed of the fine-tuned encoder + public base (encoder)"


@EMBED_ATTACKS.register("membership", config=MembershipConfig, access=ACCESS, case="membership")
def attack(access: Access, public: PublicData, cfg: MembershipConfig) -> Prediction:
    """Was a text in the indexed knowledge base or the encoder's fine-tuning data (scores per candidate)."""
    candidates = access.hints.get("candidates")
    if not candidates:
        raise CannotRun("needs the candidate texts whose membership it scores (hint 'candidates')")
    if cfg.target == "kb":
        search = access.need("search")
        rng = np.random.default_rng(public.seed)
        scores = {
            "exact_query": kb_scores(search, candidates),
            "perturbed_query": kb_scores(search, [drop_words(t, 0.2, rng) for t in candidates]),
        }
        return Prediction(scores=scores, notes={"target": "kb"})
    tuned, base = access.need("encoder"), access.need("reference")
    ft = augmentation_consistency(tuned, candidates, cfg.views, seed=public.seed)
    ref = augmentation_consistency(base, candidates, cfg.views, seed=public.seed)
    drift = cosine_rows(tuned.embed(candidates), base.embed(candidates))
    scores = {"consistency_ref": ft - ref, "consistency": ft, "drift_from_base": -drift}
    return Prediction(scores=scores, notes={"target": "encoder", "reference": f"public base model {base.name}"})
