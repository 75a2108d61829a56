"""Orthogonal matching pursuit (Pati et al. 1993) for sample-level sparse recovery of a batch gradient.

The observed gradient m of a batch is a sparse non-negative combination of per-sentence gradients:
m = Σ_{b ∈ batch} α_b g_b. Given a dictionary of candidate-sentence gradients g_i, OMP picks, one at a time,
the atom most correlated with the residual and refits least squares of m on all picked atoms (against the
original m each step, not the residual: that is what makes it *orthogonal* matching pursuit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OmpResult:
    selected: list[int]
    coef: torch.Tensor  # least-squares coefficients of the selected atoms, in selection order
    residual_norms: list[float] = field(default_factory=list)  # ‖m − D_S α‖ / ‖m‖ after each step
    stop: str = ""


def least_squares(atoms: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """α = argmin ‖target − atomsᵀ α‖ for atoms (k x n) (float64, via lstsq)."""
    return torch.linalg.lstsq(atoms.double().T, target.double().unsqueeze(1), driver="gelsd").solution.squeeze(1)


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
    available = torch.ones(d.shape[0], dtype=torch.bool)
    selected: list[int] = []
    coef = torch.zeros(0, dtype=torch.float64)
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
            available &= torch.tensor([g != groups[best] for g in groups])
        if max_atoms is None and rel < tol:
            stop = "residual below tol"
            break
    else:
        stop = "max atoms" if len(selected) >= limit else stop
    return OmpResult(selected, coef, history, stop)


def refine_swaps(atoms: torch.Tensor, target: torch.Tensor, result: OmpResult, groups: list[int]) -> OmpResult:
    """Swap each selected atom for another atom of its group when that lowers the least-squares residual
    (greedy selection can take the wrong alternative of a group early; one pass per selected atom)."""
    d, m = atoms.double(), target.double()
    m_norm = float(m.norm()) or 1.0

    def residual(sel: list[int]) -> tuple[float, torch.Tensor]:
        coef = least_squares(d[sel], m)
        return float((m - d[sel].T @ coef).norm()) / m_norm, coef

    selected = list(result.selected)
    if not selected:
        return result
    best, coef = residual(selected)
    for pos, atom in enumerate(list(selected)):
        for alt in (i for i, g in enumerate(groups) if g == groups[atom] and i != atom):
            trial = selected[:pos] + [alt] + selected[pos + 1 :]
            rel, c = residual(trial)
            if rel < best:
                best, coef, selected = rel, c, trial
    return OmpResult(selected, coef, result.residual_norms + [best], result.stop)
