"""TIGER-style continuous search (Kalikman et al., arXiv 2606.18312; our reconstruction from the abstract).

Instead of a discrete span test (a token is in the batch iff its layer input lies in the gradient's row space,
accepted below a distance threshold), the token embeddings of whole texts are optimised so that their layer-1
and layer-2 attention inputs lie close to the observed subspaces. Each position holds a softmax over a
candidate pool of tokens; its embedding is the probability-weighted mix of the pool's embedding rows, so the
search moves continuously between tokens and ends on the most likely one at each position. Nothing is
thresholded: under noise the objective ranks tokens where a threshold admits none.

The objective, per text and position t, is the squared distance of the unit input to the span,
``1 − ‖R x̂_t‖²`` (R orthonormal rows), at layer 1 (token only, for RoPE models) and layer 2 (the token in its
prefix's context: this is what places tokens at positions), averaged over positions, plus a small entropy term
that pushes each position to one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leaklab.attacks.gradient.dager import SpanModel
from leaklab.core import Config, option
from leaklab.models.adapter import FamilyAdapter


def subspace_residual(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Squared distance of each unit row ẑ of ``z`` to the span of the orthonormal rows of ``basis``:
    1 − ‖R ẑ‖² (differentiable; float64 when ``z`` is)."""
    zh = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return 1.0 - (zh @ basis.T.to(zh.dtype)).pow(2).sum(-1)


def span_coverage(x: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Mean squared distance of the basis rows r_j to the span of the unit rows x̂_i of ``x`` (ridge-regularised
    projection X̂ᵀ(X̂X̂ᵀ + εI)⁻¹X̂, stable when rows repeat): 0 when the inputs explain every observed direction.
    Without it every position may settle on the same best token; meaningful only while ``x`` has fewer rows
    than its width."""
    xh = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    b = basis.to(xh.dtype)
    gram = xh @ xh.T + ridge * torch.eye(xh.shape[0], dtype=xh.dtype, device=xh.device)
    coef = torch.linalg.solve(gram, xh @ b.T)  # (n, r)
    explained = ((xh @ b.T) * coef).sum(0)  # r_jᵀ X̂ᵀ (X̂X̂ᵀ + εI)⁻¹ X̂ r_j
    return (1.0 - explained).mean()


class _Stop(Exception):
    pass


def soft_layer_inputs(
    adapter: FamilyAdapter, embeds: torch.Tensor, mask: torch.Tensor, layers: tuple[int, ...] = (0, 1)
) -> list[torch.Tensor]:
    """The attention inputs of ``layers`` (forward order) for a batch of input embeddings (B, L, d), with the
    graph kept (the forward pass stops after the last layer needed)."""
    captured: dict[int, torch.Tensor] = {}
    names = [adapter.projections[i].module for i in layers]

    def hook_for(i: int):
        def hook(_mod, args):
            captured[i] = args[0]
            if i == len(names) - 1:
                raise _Stop

        return hook

    handles = [adapter.model.get_submodule(n).register_forward_pre_hook(hook_for(i)) for i, n in enumerate(names)]
    try:
        adapter.model(inputs_embeds=embeds, attention_mask=mask)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(names))]


@dataclass(frozen=True)
class TigerOptions(Config):
    """Options of the continuous search."""

    steps: int = option(150, "optimisation steps")
    lr: float = option(0.1, "Adam step size on the per-position pool logits")
    layer2_weight: float = option(1.0, "weight of the layer-2 (context) residual against the layer-1 one")
    coverage_weight: float = option(1.0, "weight of the layer-1 coverage term (the inputs must explain the span)")
    straight_through: bool = option(
        True, "forward the argmax token, backward through the softmax (the coverage term needs discrete rows)"
    )
    entropy_weight: float = option(0.01, "weight of the per-position entropy, raised linearly to 10x at the end")
    init_scale: float = option(20.0, "start logits = -init_scale x layer-1 distance + unit Gaussian noise")
    init_boost: float = option(20.0, "logit added to a given start text's tokens (low: the search may leave it)")

    def __post_init__(self) -> None:
        self.require(
            positive=("steps", "lr"),
            non_negative=("layer2_weight", "coverage_weight", "entropy_weight", "init_scale", "init_boost"),
        )


@dataclass
class TigerResult:
    ids: list[list[int]]  # decoded token ids per text (argmax of each position)
    residual1: torch.Tensor  # (B, L) layer-1 residual of the decoded tokens
    residual2: torch.Tensor  # (B, L) layer-2 residual of the decoded texts
    loss_curve: list[float]


def tiger_search(
    adapter: FamilyAdapter,
    basis1: torch.Tensor,
    basis2: torch.Tensor,
    pool: torch.Tensor,
    pool_dist1: torch.Tensor,
    lengths: list[int],
    opts: TigerOptions,
    seed: int = 0,
    init_ids: list[list[int]] | None = None,
) -> TigerResult:
    """Optimise len(lengths) texts of the given lengths over ``pool`` (token ids; ``pool_dist1`` their layer-1
    span distances, the start point) toward the layer-1/layer-2 subspaces ``basis1``/``basis2``. With
    ``init_ids`` (texts of those lengths, tokens from the pool) the search starts at those texts."""
    gen = torch.Generator().manual_seed(seed)
    dev = adapter.device
    n, width = len(lengths), max(lengths)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    mask = mask.to(dev)
    keep = mask.bool()
    table = adapter.embeddings.weight.detach()[pool.to(dev)]
    start = -opts.init_scale * pool_dist1.float().to(dev) + torch.randn(n, width, pool.numel(), generator=gen).to(dev)
    if init_ids is not None:
        slot = {int(t): j for j, t in enumerate(pool.tolist())}
        for i, ids in enumerate(init_ids):
            for t, tok in enumerate(ids):
                start[i, t, slot[tok]] += opts.init_boost
    logits = start.requires_grad_(True)
    adam = torch.optim.Adam([logits], lr=opts.lr)
    b1, b2 = basis1.double(), basis2.double()
    curve: list[float] = []
    for step in range(opts.steps):
        probs = torch.softmax(logits, -1)
        mix = probs
        if opts.straight_through:
            hard = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
            mix = hard + probs - probs.detach()
        x1, x2 = soft_layer_inputs(adapter, mix @ table, mask)
        flat1 = x1.double()[keep]
        r1 = subspace_residual(flat1, b1).mean()
        if opts.coverage_weight and flat1.shape[0] < flat1.shape[1]:
            r1 = r1 + opts.coverage_weight * span_coverage(flat1, b1)
        r2 = subspace_residual(x2.double()[keep], b2).mean()
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)[keep].mean()
        ramp = 1.0 + 9.0 * step / max(1, opts.steps - 1)
        loss = r1 + opts.layer2_weight * r2 + opts.entropy_weight * ramp * ent.double()
        adam.zero_grad()
        loss.backward()
        adam.step()
        curve.append(float(loss.detach()))
    return decode(adapter, b1, b2, pool, logits.detach(), lengths, curve)


@torch.no_grad()
def decode(
    adapter: FamilyAdapter,
    basis1: torch.Tensor,
    basis2: torch.Tensor,
    pool: torch.Tensor,
    logits: torch.Tensor,
    lengths: list[int],
    curve: list[float],
) -> TigerResult:
    """The argmax token at every position, with the exact residuals of the decoded (discrete) texts."""
    choice = pool.to(logits.device)[logits.argmax(-1)]
    n, width = choice.shape
    mask = torch.zeros(n, width, dtype=torch.long, device=logits.device)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    x1, x2 = soft_layer_inputs(adapter, adapter.embeddings(choice), mask)
    r1 = subspace_residual(x1.double(), basis1).masked_fill(mask == 0, float("nan"))
    r2 = subspace_residual(x2.double(), basis2).masked_fill(mask == 0, float("nan"))
    ids = [choice[i, :length].tolist() for i, length in enumerate(lengths)]
    return TigerResult(ids, r1.cpu(), r2.cpu(), curve)


@torch.no_grad()
def ranked_decode(spans: SpanModel, pool: torch.Tensor, lengths: list[int], repeats: bool = True) -> list[list[int]]:
    """Threshold-free greedy decoding: the len(lengths) pool tokens nearest to the layer-2 span at position 0
    start the texts; each text then grows by the pool token whose new layer-2 input is nearest to the span
    (an input identical to the previous one, a repeated first token, is skipped; with ``repeats`` False so is
    the previous token itself: under noise "x x" sits about as near the span as the true next token). This is
    where a continuous search of one position's embedding over the pool ends at best: the enumerated minimum
    of its objective."""
    dev = spans.device
    pool = pool.to(dev)
    empty = torch.zeros(1, 0, dtype=torch.long, device=dev)
    first, _ = spans.extension_distances(empty, pool)
    order = torch.argsort(first[0])
    texts = [[int(pool[order[i % pool.numel()]])] for i in range(len(lengths))]
    for text, length in zip(texts, lengths, strict=True):
        while len(text) < length:
            prefix = torch.tensor([text], device=dev)
            prev = spans.adapter.layer_inputs(prefix, 1)[:, -1]
            dist, _ = spans.extension_distances(prefix, pool, previous=prev)
            if not repeats:
                dist = dist.masked_fill(pool[None] == text[-1], float("inf"))
            text.append(int(pool[torch.argmin(dist[0])]))
    return texts
