"""Orthogonal matching pursuit (Pati et al. 1993) for sample-level sparse recovery of a batch gradient.

The observed gradient m of a batch is a sparse non-negative combination of per-sentence gradients:
m = Σ_{b ∈ batch} α_b g_b. Given a dictionary of candidate-sentence gradients g_i, OMP picks, one at a time,
the atom most correlated with the residual and refits least squares of m on all picked atoms (against the
original m each step, not the residual: that is what makes it *orthogonal* matching pursuit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leaklab.models.device import chunk_rows


@dataclass
class OmpResult:
    selected: list[int]
    coef: torch.Tensor  # least-squares coefficients of the selected atoms, in selection order
    residual_norms: list[float] = field(default_factory=list)  # ‖m − D_S α‖ / ‖m‖ after each step
    stop: str = ""


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin ‖a x − b‖ (float64). LAPACK's gelsd (SVD-based: near-duplicate atoms make ``a`` rank-deficient)
    exists on the CPU only, so the small solve runs there whatever the device; the result goes back."""
    return torch.linalg.lstsq(a.double().cpu(), b.double().cpu(), driver="gelsd").solution.to(a.device)


def least_squares(atoms: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """α = argmin ‖target − atomsᵀ α‖ for atoms (k x n) (float64, via lstsq)."""
    return solve(atoms.T, target.unsqueeze(1)).squeeze(1)


def omp(
    atoms: torch.Tensor,
    target: torch.Tensor,
    max_atoms: int | None = None,
    tol: float = 1e-3,
    min_gain: float = 0.01,
    groups: list[int] | None = None,
) -> OmpResult:
    """Select atoms (rows of ``atoms``, n_atoms x dim) explaining ``target`` (dim,).

    Step: i* = argmax_i |⟨r, g_i⟩| / ‖g_i‖ over unselected atoms; α = lstsq(m, D_S); r = m − D_S α.
    Stops after ``max_atoms`` atoms when given (known batch size); otherwise when ‖r‖/‖m‖ < ``tol`` or a
    step reduces ‖r‖/‖m‖ by less than ``min_gain`` (that last atom is then dropped). ``groups`` (one id per
    atom) excludes the other atoms of a group once one is chosen (e.g. one sentence under several labels).
    """
    d = atoms.double()
    m = target.double()
    m_norm = float(m.norm()) or 1.0
    norms = d.norm(dim=1).clamp_min(1e-300)
    available = torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
    selected: list[int] = []
    coef = torch.zeros(0, dtype=torch.float64, device=d.device)
    resid = m.clone()
    history: list[float] = []
    limit = min(max_atoms if max_atoms is not None else d.shape[0], d.shape[0])
    stop = "exhausted"
    while len(selected) < limit and bool(available.any()):
        score = (d @ resid).abs() / norms
        score[~available] = -1.0
        best = int(torch.argmax(score))
        trial = selected + [best]
        trial_coef = least_squares(d[trial], m)
        trial_resid = m - d[trial].T @ trial_coef
        rel = float(trial_resid.norm()) / m_norm
        if max_atoms is None and history and history[-1] - rel < min_gain:
            stop = "no gain"
            break
        selected, coef, resid = trial, trial_coef, trial_resid
        history.append(rel)
        available[best] = False
        if groups is not None:
            available &= torch.tensor([g != groups[best] for g in groups], device=d.device)
        if max_atoms is None and rel < tol:
            stop = "residual below tol"
            break
    else:
        stop = "max atoms" if len(selected) >= limit else stop
    return OmpResult(selected, coef, history, stop)


def ols(
    atoms: torch.Tensor, target: torch.Tensor, max_atoms: int, groups: list[int], gram: torch.Tensor | None = None
) -> OmpResult:
    """Orthogonal least squares (optimised OMP, Rebollo-Neira & Lowe 2002): ``max_atoms`` atoms chosen one at a
    time, each the one whose addition lowers the least-squares residual most, ⟨r, g_j⟩² / ‖P⊥_S g_j‖² with
    P⊥_S the projection off the atoms chosen so far. Unlike OMP's ⟨r, g_j⟩ / ‖g_j‖ it is not misled by
    atoms nearly parallel to those already chosen (candidate texts one token apart), at a Gram matrix's cost.
    ``groups`` as in :func:`omp`."""
    d, m = atoms.double(), target.double()
    gram = gram_matrix(atoms) if gram is None else gram
    b, mm = d @ m, float(m @ m)
    diag = gram.diagonal().clamp_min(1e-300)
    available = torch.ones(d.shape[0], dtype=torch.bool, device=d.device)
    selected: list[int] = []
    history: list[float] = []
    group_ids = torch.tensor(groups, device=d.device)
    while len(selected) < min(max_atoms, d.shape[0]) and bool(available.any()):
        if selected:
            idx = torch.tensor(selected, device=d.device)
            cross = gram[idx]  # (|S|, k)
            inv = solve(gram[idx][:, idx], torch.cat([b[idx].unsqueeze(1), cross], dim=1))
            corr = b - cross.T @ inv[:, 0]
            perp = diag - (cross * inv[:, 1:]).sum(0)
        else:
            corr, perp = b, diag
        score = corr**2 / perp.clamp_min(1e-300)
        score[(perp <= 1e-9 * diag) | ~available] = -1.0
        best = int(torch.argmax(score))
        if float(score[best]) < 0:
            break
        selected.append(best)
        available &= group_ids != groups[best]
        idx = torch.tensor(selected, device=d.device)
        coef = solve(gram[idx][:, idx], b[idx].unsqueeze(1)).squeeze(1)
        history.append(max(mm - float(b[idx] @ coef), 0.0) ** 0.5 / (mm**0.5 or 1.0))
    coef = least_squares(d[selected], m) if selected else torch.zeros(0, dtype=torch.float64, device=d.device)
    return OmpResult(selected, coef, history, "max atoms")


def gram_matrix(atoms: torch.Tensor) -> torch.Tensor:
    """D Dᵀ (float64) of the atoms (rows), summed over column chunks sized from the device's free memory: only
    a chunk of the atoms is held in float64 at a time."""
    k, dim = atoms.shape
    step = chunk_rows(8 * k, atoms.device, most=dim)  # one float64 column of every atom
    gram = torch.zeros(k, k, dtype=torch.float64, device=atoms.device)
    for s in range(0, dim, step):
        part = atoms[:, s : s + step].double()
        gram += part @ part.T
    return gram


def refine_swaps(
    atoms: torch.Tensor,
    target: torch.Tensor,
    result: OmpResult,
    groups: list[int],
    passes: int = 3,
    max_trials: int = 60_000,
    gram: torch.Tensor | None = None,
) -> OmpResult:
    """Local search after greedy selection: replace a selected atom by another atom of its group (another
    last-token guess) or by an atom of an unrepresented group (another text: greedy OMP can spend a slot on a
    near-duplicate, e.g. a truncated copy of a true text, that correlates well first but fits worse in the
    end), keeping each swap that lowers the least-squares residual; repeated until a pass changes nothing.

    Residuals of trial subsets come from the Gram matrix, ‖m − D_S α‖² = ‖m‖² − b_Sᵀ G_SS⁻¹ b_S (b = D m),
    so a trial costs one |S| × |S| solve. Other-group candidates per slot are the atoms most correlated with
    the residual, as many as ``max_trials`` allows. ``gram``: the atoms' Gram matrix when already computed."""
    d, m = atoms.double(), target.double()
    m_norm = float(m.norm()) or 1.0
    selected = list(result.selected)
    if not selected:
        return result
    gram = gram_matrix(atoms) if gram is None else gram
    b, mm = d @ m, float(m @ m)
    norms = d.norm(dim=1).clamp_min(1e-300)

    def residual(sel: list[int]) -> float:
        idx = torch.tensor(sel, device=d.device)
        coef = solve(gram[idx][:, idx], b[idx].unsqueeze(1)).squeeze(1)
        return max(mm - float(b[idx] @ coef), 0.0) ** 0.5 / m_norm

    best = residual(selected)
    width = max(4, max_trials // max(1, passes * len(selected)))
    for _ in range(passes):
        changed = False
        for pos in range(len(selected)):
            atom = selected[pos]
            others = {groups[a] for i, a in enumerate(selected) if i != pos}
            resid = m - d[selected].T @ least_squares(d[selected], m)
            score = (d @ resid).abs() / norms
            ranked = [i for i in torch.argsort(score, descending=True).tolist() if groups[i] not in others]
            same = [i for i, g in enumerate(groups) if g == groups[atom] and i != atom]
            for alt in same + [i for i in ranked[:width] if groups[i] != groups[atom]]:
                trial = selected[:pos] + [alt] + selected[pos + 1 :]
                rel = residual(trial)
                if rel < best - 1e-12:
                    best, selected, changed = rel, trial, True
                    atom = alt
        if not changed:
            break
    coef = least_squares(d[selected], m)
    return OmpResult(selected, coef, result.residual_norms + [best], result.stop)
