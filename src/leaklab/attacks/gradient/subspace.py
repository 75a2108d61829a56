"""Subspace maths shared by the gradient attacks (DAGER, SOMP).

For a linear map Y = X Wᵀ applied to the n token inputs X (n x d) of a batch, the weight gradient is
G = ∂L/∂W = Δᵀ X (out x in): every row of G is a combination of the token inputs, so the row space of G is
span(X) whenever Δ has full column rank. A candidate input x therefore belongs to the batch iff its distance
to that row space, ‖(I − RᵀR) x̂‖ with R an orthonormal basis, is (numerically) zero.

In a causal model the first position's query gets no gradient (softmax over one key is constant), so the Q
block alone misses first tokens; K and V see them. We therefore stack the Q, K and V blocks, each scaled to
unit norm so that the narrower GQA K/V blocks are not drowned out, and take the row space of the
stack. Gradients arrive in float32 (on the CPU, as shared) and are moved to the model's device; all analysis
here is in float64 on every device: span distances of batch tokens sit near 1e-6, below float32's resolution
of a unit vector's residual.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from leaklab.errors import LeaklabError
from leaklab.models.adapter import FamilyAdapter
from leaklab.models.device import chunk_rows
from leaklab.threat.observation import Observation

#: singular values below this fraction of the largest are float32 noise, never signal
NOISE_FLOOR = 1e-6
#: a drop by at least this factor between consecutive singular values marks the end of the signal (in real
#: float32 gradients the smallest signal values sit little above the round-off plateau: analysis.md)
RANK_GAP = 10.0
#: vocabulary-wide distances (at least this many rows) are screened in float32 first (:func:`screened_distance`);
#: a benchmark sets it above the vocabulary size to time the unscreened float64 path
SCREEN_MIN_ROWS = 8192
#: rows whose float32 distance is below this are recomputed in float64 (far above any span threshold)
SCREEN = 0.1


@dataclass(frozen=True)
class Subspace:
    """Orthonormal basis (rows, float64) of the span of one layer's attention inputs."""

    basis: torch.Tensor  # (r, d)
    singular_values: torch.Tensor  # all singular values of the stacked, scaled gradient (descending)
    layer: int
    complement: torch.Tensor | None = None  # (d − r, d) orthonormal basis of the orthogonal complement

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    @property
    def full(self) -> bool:
        """True when the gradient has (numerically) full rank: the span check no longer separates tokens."""
        return self.rank >= self.dim

    def capped(self, rank: int) -> Subspace:
        """The span of the leading ``rank`` directions (DAGER's best effort once the span is full)."""
        rows = torch.cat([self.basis, self.complement]) if self.complement is not None else self.basis
        rest = rows[rank:] if rows.shape[0] == self.dim else None
        return Subspace(rows[:rank], self.singular_values, self.layer, rest)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """dist(x) = ‖(I − RᵀR) x̂‖ for each row x of ``x`` (via the complement when it is the smaller side)."""
        if self.complement is not None and self.complement.shape[0] < self.rank:
            xh = x.detach().double()
            norm = xh.norm(dim=-1)
            dist = (xh @ self.complement.T).norm(dim=-1) / norm.clamp_min(1e-300)
            return torch.where(norm > 0, dist, torch.ones_like(dist))
        if x.shape[0] >= SCREEN_MIN_ROWS and x.dim() == 2:
            return screened_distance(x, self.basis)
        return span_distance(x, self.basis)


def numerical_rank(singular_values: torch.Tensor, noise_floor: float = NOISE_FLOOR, gap: float = RANK_GAP) -> int:
    """Rank of a float32-computed matrix from its descending singular values σ.

    Let s = σ/σ₁. The rank is the position of the largest drop s_i/s_{i+1} ≥ ``gap`` whose lower side lies
    below ``noise_floor`` (signal on one side, float32 round-off on the other). Without such a drop the
    spectrum is smooth: the matrix is full rank up to the values above ``noise_floor``·1e-3.
    """
    s = singular_values.double()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    s = s / s[0]
    ratio = s[:-1] / s[1:].clamp_min(1e-300)
    eligible = (ratio >= gap) & (s[1:] < noise_floor)
    if bool(eligible.any()):
        idx = torch.nonzero(eligible).flatten()
        best = idx[torch.argmax(ratio[idx])]
        return int(best) + 1
    return int((s > noise_floor * 1e-3).sum())


def row_space(
    blocks: Sequence[torch.Tensor], max_rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Orthonormal basis R (r x d) of the joint row space of ``blocks`` (each (out_i x d)), with σ of the
    stack and a basis of the orthogonal complement (None when the stack has fewer rows than d). Each block
    is scaled to unit Frobenius norm before stacking (float64)."""
    scaled = []
    for b in blocks:
        b = b.detach().double()  # noqa: PLW2901
        size = b.norm()
        if float(size) > 0:
            scaled.append(b / size)
    if not scaled:
        d, dev = blocks[0].shape[1], blocks[0].device
        f64 = {"dtype": torch.float64, "device": dev}
        return torch.zeros(0, d, **f64), torch.zeros(0, **f64), torch.eye(d, **f64)
    stack = torch.cat(scaled)
    with single_thread():
        _, s, vh = torch.linalg.svd(stack, full_matrices=False)
    r = numerical_rank(s)
    if max_rank is not None:
        r = min(r, max_rank)
    complement = vh[r:].contiguous() if vh.shape[0] == vh.shape[1] else None
    return vh[:r].contiguous(), s, complement


@contextmanager
def single_thread():
    """Run LAPACK on one thread: on a busy 2-core machine a threaded SVD of a few hundred rows is ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def span_distance(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """‖x̂ − RᵀR x̂‖ per row of x (x̂ = x/‖x‖); R has orthonormal rows. Computed in float64."""
    xh = x.detach().double()
    norm = xh.norm(dim=-1, keepdim=True)
    xh = xh / norm.clamp_min(1e-300)
    if basis.shape[0] == 0:
        return torch.ones(xh.shape[:-1], dtype=torch.float64, device=xh.device)
    # ‖x̂ − RᵀRx̂‖² = 1 − ‖Rx̂‖² for orthonormal R; the direct form is more accurate near 0
    resid = xh - (xh @ basis.T) @ basis
    dist = resid.norm(dim=-1)
    return torch.where(norm.squeeze(-1) > 0, dist, torch.ones_like(dist))  # a zero input is in no span


def screened_distance(x: torch.Tensor, basis: torch.Tensor, screen: float = SCREEN) -> torch.Tensor:
    """:func:`span_distance` of many rows at a fraction of the cost: a float32 screen, dist² ≈ 1 − ‖R x̂‖² (one
    matmul), finds the pool of rows near the span; only those are recomputed exactly (float64, direct form).
    The other rows keep the screen's value, which lies ``screen`` or more from the span, far above any
    membership threshold, and within float32 round-off of the exact distance. Rows go a chunk at a time
    (from the device's free memory: a float32 copy of the row and its projection)."""
    step = chunk_rows(4 * (x.shape[1] + basis.shape[0]) * 2, x.device)
    return torch.cat([_screened(x[s : s + step], basis, screen) for s in range(0, x.shape[0], step)])


def _screened(x: torch.Tensor, basis: torch.Tensor, screen: float) -> torch.Tensor:
    xh = x.detach().float()
    norm = xh.norm(dim=-1, keepdim=True)
    xh = xh / norm.clamp_min(1e-30)
    if basis.shape[0] == 0:
        return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    energy = (xh @ basis.float().T).pow(2).sum(-1)
    dist = (1.0 - energy).clamp_min(0).sqrt().double()
    dist = torch.where(norm.squeeze(-1) > 0, dist, torch.ones_like(dist))
    pool = torch.nonzero(dist < screen).flatten()
    if pool.numel():
        dist[pool] = span_distance(x[pool], basis)
    return dist


def attention_blocks(
    obs: Observation, adapter: FamilyAdapter, layer: int, which: Sequence[str] = ("q", "k", "v")
) -> list[torch.Tensor]:
    """The (out x in) gradient blocks of ``layer``'s attention projections named in ``which``, on the model's
    device."""
    proj = adapter.projections[layer]
    out = []
    for key, p in proj:
        if key not in which:
            continue
        if p.param not in obs.gradients:
            raise LeaklabError(
                f"the update has no gradient for '{p.param}' (layer {layer} attention {key}); "
                "span checks need the first two layers' attention gradients"
            )
        out.append(p.matrix(obs.gradients[p.param]).to(adapter.device))
    return out


def attention_subspace(
    obs: Observation,
    adapter: FamilyAdapter,
    layer: int,
    which: Sequence[str] = ("q", "k", "v"),
    max_rank: int | None = None,
) -> Subspace:
    """Row space of layer ``layer``'s stacked (Q, K, V) attention gradients = span of its inputs."""
    basis, s, complement = row_space(attention_blocks(obs, adapter, layer, which), max_rank)
    return Subspace(basis, s, layer, complement)


def mlp_subspace(obs: Observation, adapter: FamilyAdapter, layer: int, max_rank: int | None = None) -> Subspace:
    """Row space of layer ``layer``'s MLP input-projection gradients = span of its post-attention hidden
    states (prefix-dependent, like the next layer's attention inputs, but reached without the MLP)."""
    mlp = adapter.mlp_inputs(layer)
    blocks = []
    for p in mlp.projections:
        if p.param not in obs.gradients:
            raise LeaklabError(f"the update has no gradient for '{p.param}' (layer {layer} MLP input)")
        blocks.append(p.matrix(obs.gradients[p.param]).to(adapter.device))
    basis, s, complement = row_space(blocks, max_rank)
    return Subspace(basis, s, layer, complement)


def candidate_inputs(adapter: FamilyAdapter, token_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
    """First-layer attention input of each token alone at ``position`` (n x d)."""
    return adapter.token_inputs(token_ids, position=position, layer=0)


def token_distances(adapter: FamilyAdapter, sub: Subspace, token_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
    """Layer-1 span distance of every token in ``token_ids`` placed at ``position``."""
    return sub.distance(candidate_inputs(adapter, token_ids, position))


def sequence_inputs(
    adapter: FamilyAdapter, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Input of ``layer``'s attention projections for whole sequences (batch, tokens, d)."""
    return adapter.layer_inputs(input_ids, layer, attention_mask=attention_mask)


@torch.no_grad()
def extension_inputs(
    adapter: FamilyAdapter, prefixes: torch.Tensor, tokens: torch.Tensor, layer: int = 1, chunk: int = 2048
) -> torch.Tensor:
    """Input of ``layer``'s attention at the new last position of every prefix + token extension.

    ``prefixes`` (n x p, all the same length, no padding), ``tokens`` (m,): returns (n, m, d) where [i, j]
    belongs to prefixes[i] + [tokens[j]]. Causal models only: the prefixes' layer caches are computed once
    and each extension costs one token's forward pass.
    """
    n, m = prefixes.shape[0], tokens.numel()
    rows = torch.arange(n, device=tokens.device).repeat_interleave(m)
    return pair_inputs(adapter, prefixes, rows, tokens.repeat(n), layer, chunk).view(n, m, -1)


@torch.no_grad()
def pair_inputs(
    adapter: FamilyAdapter,
    prefixes: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    layer: int = 1,
    chunk: int = 2048,
) -> torch.Tensor:
    """Input of ``layer``'s attention at the last position of prefixes[rows[k]] + [tokens[k]] (k x d)."""
    return pair_module_inputs(adapter, prefixes, rows, tokens, [adapter.projections[layer].module], layer, chunk)[0]


@torch.no_grad()
def pair_module_inputs(
    adapter: FamilyAdapter,
    prefixes: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    modules: list[str],
    cache_layers: int,
    chunk: int = 2048,
) -> list[torch.Tensor]:
    """Inputs of ``modules`` (forward order) at the last position of prefixes[rows[k]] + [tokens[k]], one
    (k x d) tensor per module. The prefixes' key/value caches of the first ``cache_layers`` blocks (all the
    modules need) are computed once; each extension then costs one token's forward pass."""
    from transformers import DynamicCache

    p = prefixes.shape[1]
    prefixes, rows, tokens = prefixes.to(adapter.device), rows.to(adapter.device), tokens.to(adapter.device)
    dtype = adapter.embeddings.weight.dtype
    outs = [torch.empty(tokens.numel(), adapter.hidden_size, dtype=dtype, device=adapter.device) for _ in modules]

    def put(s: int, got: list[torch.Tensor]) -> None:
        for out, g in zip(outs, got, strict=True):
            out[s : s + g.shape[0]] = g[:, -1]

    if p == 0:
        for s in range(0, tokens.numel(), chunk):
            ids = tokens[s : s + chunk].view(-1, 1)
            put(s, adapter.module_inputs(ids, modules, position_ids=torch.zeros_like(ids)))
        return outs
    cache = DynamicCache()
    if cache_layers > 0:
        deepest = adapter.projections[min(cache_layers, adapter.num_layers - 1)].module
        if cache_layers < adapter.num_layers:
            adapter.module_inputs(prefixes, [deepest], past_key_values=cache, use_cache=True)
        else:
            adapter.model(input_ids=prefixes, past_key_values=cache, use_cache=True)
    kv = [(lay.keys, lay.values) for lay in cache.layers[:cache_layers]]
    for s in range(0, tokens.numel(), chunk):
        sel_rows = rows[s : s + chunk]
        sel = DynamicCache(ddp_cache_data=[(k.index_select(0, sel_rows), v.index_select(0, sel_rows)) for k, v in kv])
        ids = tokens[s : s + chunk].view(-1, 1)
        pos = torch.full_like(ids, p)
        put(s, adapter.module_inputs(ids, modules, position_ids=pos, past_key_values=sel, use_cache=True))
    return outs


def head_blocks(obs: Observation, adapter: FamilyAdapter, layer: int = 0) -> list[tuple[str, int, torch.Tensor]]:
    """(projection, head, block) for every attention head of ``layer``: the head's (head_dim x d) rows of the
    Q, K and V gradients (GQA: K and V have fewer heads)."""
    hd = adapter.head_dim
    out = []
    for key, g in zip(("q", "k", "v"), attention_blocks(obs, adapter, layer), strict=True):
        for h in range(g.shape[0] // hd):
            out.append((key, h, g[h * hd : (h + 1) * hd]))
    return out


def whitener(second: torch.Tensor, ridge: float) -> torch.Tensor:
    """(d, d) symmetric M^(−1/2) of the second-moment matrix ``second`` + ``ridge`` × its top eigenvalue: in
    that metric the directions all the vectors share (massive activations, the mean) no longer dominate a
    cosine or a projection (SOMP's output-gradient filter, the head-wise scores)."""
    evals, evecs = torch.linalg.eigh(second.double())
    evals = evals.clamp_min(0) + ridge * float(evals.max())
    return (evecs * evals.rsqrt()) @ evecs.T


def headwise_scores(
    obs: Observation, adapter: FamilyAdapter, inputs: torch.Tensor, layer: int = 0, whiten: bool = True
) -> torch.Tensor:
    """Head-wise subspace score of each candidate input (rows of ``inputs``, e.g. every token's layer-1 input):
    max over heads of the energy of the unit input in the head's gradient row space, ‖R_h x̂‖², divided by
    what a random direction gets (r_h / d); higher = more like the batch's inputs.

    Each head's block G_h = Δ_hᵀ X has at most head_dim rows, so it never spans all of X and the score does
    not need the stacked gradient to be below full rank (SOMP's "head-wise geometric structure"). With
    ``whiten`` both sides are taken in the metric of the candidates' own second moments M: G_h M^(-1/2) =
    Δ_hᵀ (X M^(-1/2)) spans the whitened inputs."""
    x = inputs.detach().double()
    if whiten:
        xc = x - x.mean(0)
        w = whitener(xc.T @ xc / max(1, x.shape[0]), 1e-4)
    else:
        w = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    x = x @ w
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    best = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _key, _h, block in head_blocks(obs, adapter, layer):
        basis, _, _ = row_space([block.double() @ w])
        if basis.shape[0] == 0:
            continue
        energy = (x @ basis.T).pow(2).sum(1) / (basis.shape[0] / x.shape[1])
        best = torch.maximum(best, energy)
    return best
