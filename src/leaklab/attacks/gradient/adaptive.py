"""Adaptive SOMP: an attacker who knows the defense on the update (the server sees ``meta["defenses"]``).

A defense is credited only against an attacker who knows it. The span checks read the gradients of the tensors
whose rows lie in the span of a layer's inputs (the first two layers' Q/K/V, the first layer's MLP inputs);
each group G (out × d, the tensors sharing one input, stacked) is a rank-n matrix for n batch tokens below d.
Before SOMP runs, ``somp-adaptive`` restores that structure where the defense allows:

* Gaussian noise of known σ (Laplace of known scale b: σ = √2·b), also after clipping. Layer 1's inputs depend
  on the token alone, so its group is tested against the vocabulary itself (:func:`select_tokens`): tokens are
  added greedily by how much of the group's energy their input explains, while that gain exceeds what a
  pure-noise direction shows (σ²·χ²_M, :func:`null_gain_bound`), then pruned the same way; the layer-1 group
  is projected onto the selected inputs' span. This per-token test keeps tokens whose singular directions
  sink below the noise's spectral edge. The other groups (layer 2, layer-1 MLP input: prefix-dependent inputs,
  no dictionary) keep their right singular directions above ``margin`` × σ(√M + √d), the noise's spectral
  norm (M × d the group's shape). SOMP then runs its pool decoder on the selected tokens (robust-z span checks
  with the thresholds ``noise_end_z`` / ``noise_stop_z``), and OMP on the denoised groups.
* Top-k sparsification: the server sees which coordinates were kept (the non-zero ones). The group is completed
  as a low-rank matrix from the kept entries (hard-impute: fill the dropped entries from the rank-r SVD of the
  current estimate, ``impute_iters`` times). The rank r is chosen on a grid by how well the completion predicts
  a held-out 5 % of the kept entries; with fewer kept entries than a rank-r matrix has degrees of freedom the
  group is underdetermined, recorded in ``info["adaptive"]`` (SOMP still runs on the completion). Only the two
  attention groups are completed (the exact regime reads only them; the MLP input group, read past the rank
  limit, stays as kept). Kept coordinates alone: a fully kept block of the layer-1 group whose rank is below
  both its row count and its width spans the batch's inputs restricted to its columns, so the exact span check
  on those columns gives the token set (:func:`saturated_block`, :func:`block_tokens`), decoded by SOMP's pool
  decoder. With those tokens the layer-1 group is not completed but refit on their inputs' span from its kept
  entries (:func:`rebuild_on_inputs`, exact for rows kept on enough columns), so the span checks see layer 1
  as exact and every decoder draws its candidates from those tokens. Without a saturated block the tokens
  are those whose input-embedding gradient row keeps at least ``row_share`` of its entries
  (:func:`kept_row_tokens`; a superset of the batch's tokens with a tied head), handled the same way. OMP
  then compares the update's kept coordinates only (``SompAttack(kept_from=...)``).
* DP-SGD (per-sample clipping to C, then N(0, σ²C²) on the sum, divided by B): the noise on the shared mean
  gradient is Gaussian with std σ·C/B per coordinate (σ = the recorded noise multiplier, B = the granted batch
  size); the per-sample clipping only rescales each text's rows, which leaves their span unchanged. The same
  known-σ projection as for Gaussian noise; without a granted B the step is skipped (recorded).
* Clipping: span checks and OMP are scale-free; nothing to undo.

Other defenses pass through unchanged (recorded). What was done is in ``info["adaptive"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from leaklab.attacks.base import NoSignal, Recovery, register_gradient_attack
from leaklab.attacks.gradient.somp import SompAttack, SompOptions
from leaklab.attacks.gradient.subspace import (
    candidate_inputs,
    numerical_rank,
    row_space,
    single_thread,
    span_distance,
)
from leaklab.core import option
from leaklab.models.registry import LoadedModel, load_model
from leaklab.threat.observation import Observation

#: layers whose attention inputs the span checks read, and the layer whose MLP input the full-rank checks read
SPAN_LAYERS = (0, 1)


def span_groups(loaded: LoadedModel, grads: dict[str, torch.Tensor]) -> list[list[tuple[str, bool]]]:
    """(parameter, transposed) per group of shared tensors whose gradient rows share one input space."""
    ad = loaded.adapter
    groups = []
    for layer in SPAN_LAYERS:
        seen: dict[str, bool] = {}
        for _, p in ad.projections[layer]:
            seen.setdefault(p.param, p.transposed)
        groups.append(list(seen.items()))
    groups.append([(p.param, p.transposed) for p in ad.mlp_inputs(0).projections])
    return [[(n, t) for n, t in g if n in grads] for g in groups if any(n in grads for n, _ in g)]


def _stack(grads: dict[str, torch.Tensor], group: list[tuple[str, bool]]) -> torch.Tensor:
    return torch.cat([(grads[n].t() if t else grads[n]).double() for n, t in group])


def _unstack(stack: torch.Tensor, grads: dict[str, torch.Tensor], group: list[tuple[str, bool]]) -> None:
    start = 0
    for n, t in group:
        rows = grads[n].shape[1] if t else grads[n].shape[0]
        block = stack[start : start + rows]
        grads[n] = (block.t() if t else block).to(grads[n].dtype).contiguous()
        start += rows


def project_known_noise(stack: torch.Tensor, sigma: float, margin: float) -> tuple[torch.Tensor, int]:
    """``stack`` projected onto its right singular directions whose singular value exceeds
    margin · σ(√M + √d) (the spectral norm of an M × d matrix of N(0, σ²) entries); with the rank kept."""
    m, d = stack.shape
    with single_thread():
        _, s, vh = torch.linalg.svd(stack, full_matrices=False)
    k = int((s > margin * sigma * (math.sqrt(m) + math.sqrt(d))).sum())
    basis = vh[:k]
    return (stack @ basis.T) @ basis, k


def null_gain_bound(sigma: float, rows: int, z: float) -> float:
    """Largest gain ‖N u‖² a pure-noise direction may show: for a unit u and N (rows × d) of N(0, σ²) entries,
    ‖N u‖²/σ² is χ² with ``rows`` degrees of freedom (mean rows, std √(2·rows)); the bound is ``z`` stds
    above the mean."""
    return sigma**2 * (rows + z * math.sqrt(2 * rows))


def select_tokens(stack: torch.Tensor, inputs: torch.Tensor, sigma: float, z: float) -> tuple[list[int], dict]:
    """The batch's layer-1 tokens from a noisy span group ``stack`` (M × d, N(0, σ²) per entry) and every
    token's layer-1 input (rows of ``inputs``): greedy selection in the row space, then backward pruning.

    The clean group is G = A X (X: the batch's distinct inputs), so ‖G(I − P_S)‖² — the energy left outside the
    span of the selected inputs S — falls by ‖G u‖² when x is added (u: x's unit component orthogonal to S).
    Each step adds the token with the largest gain; it stops when no gain exceeds what a pure-noise direction
    shows (:func:`null_gain_bound`: the noise's energy along any fixed direction is σ²·χ²_M). Then every
    selected token whose own direction (orthogonal to the others) carries no more than the bound is dropped,
    one at a time (an early pick that the true tokens explain later). Returns the row indices of ``inputs``."""
    x = inputs.double()
    g = stack.double()
    m, d = g.shape
    bound = null_gain_bound(sigma, m, z)
    with single_thread():
        w = g.T @ g
        norms2 = (x * x).sum(1)
        base = ((x @ w) * x).sum(1)
        q = x.new_zeros(d, 0)
        c = x.new_zeros(x.shape[0], 0)  # X Q
        b = x.new_zeros(x.shape[0], 0)  # X W Q
        chosen: list[int] = []
        gain = torch.zeros(0)
        while len(chosen) < d - 1:
            qwq = q.T @ w @ q
            num = base - 2 * (c * b).sum(1) + ((c @ qwq) * c).sum(1)
            gain = num / (norms2 - (c * c).sum(1)).clamp_min(1e-300)
            gain[norms2 <= 1e-12 * float(norms2.max())] = -1.0
            if chosen:
                gain[chosen] = -1.0
            best = int(gain.argmax())
            if float(gain[best]) <= bound:
                break
            chosen.append(best)
            v = x[best] - q @ (q.T @ x[best])
            v = v / v.norm()
            q = torch.cat([q, v[:, None]], 1)
            c = torch.cat([c, (x @ v)[:, None]], 1)
            b = torch.cat([b, (x @ (w @ v))[:, None]], 1)
        forward = len(chosen)
        pruned = prune_tokens(g, x, chosen, bound)
    info = {"selected": len(pruned), "forward": forward, "pruned": forward - len(pruned), "null_bound": bound}
    return pruned, info


def own_gains(stack: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """‖G u_j‖² for each row x_j of ``rows``, u_j its unit component orthogonal to the other rows (what G
    loses when x_j leaves the set)."""
    gram = rows @ rows.T
    dual = torch.linalg.solve(gram, rows)  # row j: (X Xᵀ)⁻¹ X, orthogonal to every other row, ⟨·, x_j⟩ = 1
    u = dual / dual.norm(dim=1, keepdim=True)
    return (u @ stack.T).pow(2).sum(1)


def prune_tokens(stack: torch.Tensor, inputs: torch.Tensor, chosen: list[int], bound: float) -> list[int]:
    """Drop, one at a time, the chosen token whose own direction carries the least gain while that is within
    ``bound`` (noise)."""
    keep = list(chosen)
    while len(keep) > 1:
        gains = own_gains(stack, inputs[keep])
        worst = int(gains.argmin())
        if float(gains[worst]) > bound:
            break
        keep.pop(worst)
    return keep


def saturated_block(
    stack: torch.Tensor, kept: torch.Tensor, slack: int = 4
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, columns) of a fully kept block of a sparsified group whose rank r is below both its row count and
    its width c by ``slack`` or more (None if there is none): such a block's row space is the batch's inputs'
    span restricted to those columns. Blocks are the c most-kept columns and the rows kept on all of them, for
    every c; the widest complement (c − r) wins."""
    order = torch.argsort(kept.sum(0), descending=True)
    best, best_room = None, 0
    for c in range(8, stack.shape[1] + 1, 4):
        cols = order[:c]
        rows = torch.nonzero(kept[:, cols].all(1)).flatten()
        if rows.numel() < c // 2:
            break
        r = numerical_rank(torch.linalg.svdvals(stack[rows][:, cols]))
        if r + slack <= min(rows.numel(), c) and c - r > best_room:
            best, best_room = (rows, cols), c - r
    return best


def block_tokens(
    stack: torch.Tensor, block: tuple[torch.Tensor, torch.Tensor], inputs: torch.Tensor, tau: float
) -> torch.Tensor:
    """Indices of the rows of ``inputs`` whose restriction to the block's columns lies in the block's row space
    (span distance below ``tau``): the exact span check on kept coordinates only."""
    rows, cols = block
    basis, _, _ = row_space([stack[rows][:, cols]])
    return torch.nonzero(span_distance(inputs[:, cols], basis) < tau).flatten()


def rebuild_on_inputs(observed: torch.Tensor, kept: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Each row of a sparsified group refit on the span of known ``inputs`` (r × d) from its kept entries alone:
    row i = c_i X with c_i the least-squares solution of g_i[K_i] = c_i X[:, K_i] (K_i: its kept columns;
    the minimum-norm one where fewer than r are kept, zero where none is). When the clean group is C X, every
    row kept on r or more columns in general position comes back exactly, dropped entries included."""
    x = inputs.double()
    out = observed.new_zeros(observed.shape, dtype=torch.float64)
    with single_thread():
        for i in range(observed.shape[0]):
            cols = torch.nonzero(kept[i]).flatten()
            if cols.numel() == 0:
                continue
            sub = x[:, cols].T  # |K_i| × r
            coef = torch.linalg.lstsq(sub, observed[i, cols].double().unsqueeze(1), driver="gelsd").solution
            out[i] = coef.squeeze(1) @ x
    return out


def complete_low_rank(observed: torch.Tensor, kept: torch.Tensor, rank: int, iters: int) -> torch.Tensor:
    """Hard-impute: X ← kept entries of ``observed``, the others from the rank-``rank`` SVD of X (``iters``
    rounds, starting from the zero-filled matrix)."""
    x = observed.clone()
    for _ in range(iters):
        x = torch.where(kept, observed, truncated(x, rank))
    return x


def truncated(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``x`` (randomised SVD when the rank is small against x's size)."""
    with single_thread():
        if 4 * rank < min(x.shape):
            u, s, v = torch.svd_lowrank(x, q=rank + 10, niter=4)
            return (u[:, :rank] * s[:rank]) @ v[:, :rank].T
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def choose_rank(observed: torch.Tensor, kept: torch.Tensor, ranks: list[int], iters: int, seed: int = 0) -> int:
    """The rank whose completion best predicts a held-out 5 % of the kept entries (relative error): the best of
    ``ranks``, then of ranks within ±50 % of it (eighths of it apart)."""
    best = _held_out_best(observed, kept, ranks, iters, seed)
    cap = max(ranks)
    fine = sorted({max(1, min(cap, round(best * f / 8))) for f in range(4, 13)})
    return _held_out_best(observed, kept, fine, iters, seed)


def _held_out_best(observed: torch.Tensor, kept: torch.Tensor, ranks: list[int], iters: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    held = kept & (torch.rand(kept.shape, generator=gen, dtype=torch.float64) < 0.05)
    train = kept & ~held
    truth = observed[held]
    scale = float(truth.norm()) or 1.0
    errors = {}
    for r in ranks:
        fit = complete_low_rank(torch.where(train, observed, 0.0), train, r, iters)
        errors[r] = float((fit[held] - truth).norm()) / scale
    return min(errors, key=errors.get)


def known_sigma(rec: dict[str, Any], batch_size: int | None) -> float | None:
    """Per-coordinate std of the noise a defense record adds to the shared update (None: not a noise defense,
    or DP-SGD without the batch size)."""
    name = rec["name"]
    if name == "gaussian":
        return float(rec["std"])
    if name == "laplace":
        return math.sqrt(2) * float(rec["scale"])
    if name == "dpsgd" and batch_size:
        return float(rec["noise_multiplier"]) * float(rec["params"]["clip"]) / batch_size
    return None


@dataclass
class Adapted:
    """The update with the known defense undone where the structure allows, what was done, and (known noise)
    the layer-1 token set selected with the known σ."""

    obs: Observation
    info: dict[str, Any]
    tokens: torch.Tensor | None = None


def adapt(
    obs: Observation, margin: float, iters: int, z: float = 6.0, tau: float = 1e-3, row_share: float = 0.5
) -> Adapted:
    """The update with each known defense's damage to the span groups undone where the structure allows."""
    loaded = load_model(obs.model)
    grads = dict(obs.gradients)
    groups = span_groups(loaded, grads)
    done: list[dict[str, Any]] = []
    tokens = None
    for rec in obs.defenses:
        name = rec["name"]
        sigma = known_sigma(rec, obs.batch_size)
        if sigma is not None:
            step, tokens = _denoise(loaded, grads, groups, sigma, margin, z)
            done.append({"defense": name, **step})
        elif name == "dpsgd":
            done.append({"defense": name, "note": "batch size not granted: the noise's std is unknown, passed through"})
        elif name == "topk":
            block_info, tokens = _kept_block_tokens(loaded, grads, groups, tau)
            if tokens is None:
                block_info["kept_rows"], tokens = kept_row_tokens(loaded, grads, row_share)
            done.append({"defense": name, **block_info, **_sparse_groups(loaded, grads, groups, iters, tokens)})
        elif name == "clip":
            done.append({"defense": name, "note": "span checks and OMP are scale-free: nothing to undo"})
        else:
            done.append({"defense": name, "note": "no adaptive step: passed through"})
    return Adapted(replace(obs, gradients=grads), {"steps": done}, tokens)


def _denoise(
    loaded: LoadedModel,
    grads: dict[str, torch.Tensor],
    groups: list[list[tuple[str, bool]]],
    sigma: float,
    margin: float,
    z: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Known σ: the layer-1 tokens by :func:`select_tokens` and the layer-1 group projected onto their inputs'
    span; the other groups projected onto their singular directions above the noise's edge."""
    ad = loaded.adapter
    vocab = torch.arange(ad.embeddings.num_embeddings, device=ad.device)
    with torch.no_grad():
        inputs = candidate_inputs(ad, vocab, 0).double()
    stack = _stack(grads, groups[0])
    picked, select_info = select_tokens(stack, inputs, sigma, z)
    basis = torch.linalg.qr(inputs[picked].T).Q.T if picked else inputs.new_zeros(0, stack.shape[1])
    _unstack((stack @ basis.T) @ basis, grads, groups[0])
    ranks = [len(picked)]
    for g in groups[1:]:
        projected, k = project_known_noise(_stack(grads, g), sigma, margin)
        _unstack(projected, grads, g)
        ranks.append(k)
    step = {"sigma": sigma, "kept_ranks": ranks, "token_selection": select_info}
    return step, vocab[torch.tensor(picked, dtype=torch.long, device=ad.device)]


def _kept_block_tokens(
    loaded: LoadedModel, grads: dict[str, torch.Tensor], groups: list[list[tuple[str, bool]]], tau: float
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Top-k: the layer-1 tokens from the exact span check on a saturated fully kept block (None without one)."""
    stack = _stack(grads, groups[0])
    block = saturated_block(stack, stack != 0)
    if block is None:
        return {"kept_block": None}, None
    ad = loaded.adapter
    vocab = torch.arange(ad.embeddings.num_embeddings, device=ad.device)
    with torch.no_grad():
        inputs = candidate_inputs(ad, vocab, 0).double()
    found = block_tokens(stack, block, inputs, tau)
    info = {
        "kept_block": {"rows": int(block[0].numel()), "columns": int(block[1].numel()), "tokens": int(found.numel())}
    }
    return info, (vocab[found] if found.numel() else None)


def kept_row_tokens(
    loaded: LoadedModel, grads: dict[str, torch.Tensor], share: float
) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """Top-k without a saturated block: the tokens whose input-embedding gradient row keeps at least ``share``
    of its entries, most-kept first (None without such a gradient or row). A batch token's row carries its
    positions' input gradients and survives the cut; with a tied output head the softmax's most probable
    tokens survive too (extra tokens: the decoder and OMP choose)."""
    emb = loaded.adapter.embeddings.weight
    name = next((n for n, p in loaded.model.named_parameters() if p is emb), None)
    if name is None or name not in grads:
        return None, None
    counts = (grads[name] != 0).sum(1)
    rows = torch.nonzero(counts >= share * grads[name].shape[1]).flatten()
    if rows.numel() == 0:
        return {"share": share, "tokens": 0}, None
    rows = rows[torch.argsort(counts[rows], descending=True)]
    return {"share": share, "tokens": int(rows.numel())}, rows.to(loaded.adapter.device)


def _sparse_groups(
    loaded: LoadedModel,
    grads: dict[str, torch.Tensor],
    groups: list[list[tuple[str, bool]]],
    iters: int,
    tokens: torch.Tensor | None,
) -> dict[str, Any]:
    """Top-k: with the layer-1 tokens known (a saturated kept block), the layer-1 group is refit on their inputs'
    span from its kept entries (:func:`rebuild_on_inputs`: exact, and the span checks see layer 1 as exact, so
    every decoder draws its candidates from those tokens, not from a full-rank pool); the other attention
    group is completed as a low-rank matrix. Without known tokens both are completed."""
    if tokens is None:
        return _complete(loaded, grads, groups, iters)
    stack = _stack(grads, groups[0])
    with torch.no_grad():
        inputs = candidate_inputs(loaded.adapter, tokens, 0).double()
    _unstack(rebuild_on_inputs(stack, stack != 0, inputs), grads, groups[0])
    layer1 = {
        "rebuilt_on_tokens": int(tokens.numel()),
        "rows_underdetermined": int(((stack != 0).sum(1) < len(tokens)).sum()),
    }
    return {"layer1": layer1, **_complete(loaded, grads, groups[1 : len(SPAN_LAYERS)], iters)}


def _complete(
    loaded: LoadedModel, grads: dict[str, torch.Tensor], groups: list[list[tuple[str, bool]]], iters: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"groups": []}
    for g in groups[: len(SPAN_LAYERS)]:  # the attention groups; the MLP group is read only past the rank limit
        stack = _stack(grads, g)
        kept = stack != 0
        cap = min(stack.shape) // 2
        grid = [r for r in (8, 16, 32, 64, 128, 256) if r <= cap] or [max(1, cap)]
        rank = choose_rank(stack, kept, grid, max(5, iters // 4))
        free = rank * (sum(stack.shape) - rank)
        _unstack(complete_low_rank(stack, kept, rank, iters), grads, g)
        n_kept = int(kept.sum())
        out["groups"].append({"rank": rank, "kept": n_kept, "underdetermined": n_kept < free})
    return out


@dataclass(frozen=True)
class AdaptiveOptions(SompOptions):
    """SOMP's options plus the adaptive steps'."""

    margin: float = option(1.0, "known noise: keep singular directions above margin x the noise's spectral norm")
    impute_iters: int = option(60, "top-k: hard-impute rounds of the low-rank completion")
    row_share: float = option(
        0.5, "top-k without a saturated kept block: tokens whose embedding-gradient row keeps this share"
    )
    noise_z: float = option(6.0, "known noise: a token's gain must pass the noise's chi-square mean by this many stds")
    noise_prior: bool = option(False, "known noise: decode with the model's prior and the output-gradient filter too")
    noise_end_z: float = option(5.0, "known noise: end_z of the pool decoder (the true extension stands out less)")
    noise_stop_z: float = option(3.0, "known noise: stop_z of the pool decoder")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(
            positive=("margin", "impute_iters", "noise_z", "row_share"), non_negative=("noise_end_z", "noise_stop_z")
        )


@register_gradient_attack(
    "somp-adaptive", AdaptiveOptions, settings=("fedsgd",), help="SOMP after undoing the known defense"
)
class AdaptiveSomp:
    """SOMP on the update with the known defense's damage to the span tensors undone (denoised / completed)."""

    name = "somp-adaptive"

    def __init__(self, opts: AdaptiveOptions | None = None) -> None:
        self.opts = opts or AdaptiveOptions()

    def run(self, obs: Observation) -> Recovery:
        o = self.opts
        done = adapt(obs, o.margin, o.impute_iters, o.noise_z, o.tau1, o.row_share)
        if done.tokens is not None and done.tokens.numel() == 0:
            raise NoSignal("known noise: no layer-1 token's gain exceeds the noise bound")
        opts = self.opts
        if done.tokens is not None:
            opts = replace(opts, end_z=opts.noise_end_z, stop_z=opts.noise_stop_z)
        sparse = any(rec["name"] == "topk" for rec in obs.defenses)
        atk = SompAttack(opts, kept_from=obs if sparse else None)
        rec = atk.run(done.obs, tokens=done.tokens, prior=self.opts.noise_prior)
        rec.info["adaptive"] = done.info
        return rec
