"""Residual-verified refinement of OMP's chosen texts (sentence-level evidence from the whole observed gradient).

After OMP has chosen B texts, each chosen text is edited in turn (SOMP's edits,
:class:`leaklab.attacks.gradient.somp.TextEdits`: cut back a few tokens, then continued by a few tokens) and an
edit is kept when replacing the text's atom by the edited text's gradient lowers the least-squares residual of
the observed gradient over the dictionary's coordinates (every other chosen text refit). The residual is
sentence-level evidence: a text's gradient is the sum of its positions' terms, so a right continuation explains
a part of the observed gradient that a wrong one does not. One token's terms are small next to what the other
texts' errors leave in the residual; a continuation of several tokens separates better (analysis.md, session
17).

For the replaced slot i with the other chosen atoms A (rows) fixed, the refit residual of a candidate c is
‖r‖² − ⟨r, c⊥⟩² / ‖c⊥‖², with r the target's residual off A and c⊥ the candidate off A
(:func:`replacement_residuals`), so every candidate of a slot costs two inner products after one projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def orthonormal_rows(atoms: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """(r, dim) an orthonormal basis of the row space of ``atoms`` (float64), numerically dependent rows
    dropped (near-duplicate texts make the dictionary rank-deficient)."""
    if atoms.shape[0] == 0:
        return atoms.new_zeros(0, atoms.shape[1], dtype=torch.float64)
    _, s, vh = torch.linalg.svd(atoms.double(), full_matrices=False)
    keep = s > rtol * s[0].clamp_min(1e-300)
    return vh[keep]


def replacement_residuals(
    atoms: torch.Tensor, target: torch.Tensor, slot: int, candidates: torch.Tensor, rtol_new: float = 1e-6
) -> torch.Tensor:
    """(c,) relative least-squares residual ‖m − D α‖ / ‖m‖ when row ``slot`` of ``atoms`` (k, dim) is replaced
    by each row of ``candidates`` (c, dim) and all coefficients are refit (``slot`` = k: the candidate is
    added instead). A candidate whose part off the other atoms is below ``rtol_new`` of its norm adds nothing."""
    m = target.double()
    others = torch.cat([atoms[:slot], atoms[slot + 1 :]]).double()
    basis = orthonormal_rows(others)
    resid = m - basis.T @ (basis @ m)
    cands = candidates.double()
    perp = cands - (cands @ basis.T) @ basis
    sq = (perp * perp).sum(dim=1)
    new = sq > (rtol_new * cands.norm(dim=1)) ** 2  # else the candidate lies in the others' span: no new fit
    gain = torch.where(new, (perp @ resid) ** 2 / sq.clamp_min(1e-300), torch.zeros_like(sq))
    rr = (resid @ resid - gain).clamp_min(0.0)
    return rr.sqrt() / m.norm().clamp_min(1e-300)


def fit_residual(atoms: torch.Tensor, target: torch.Tensor) -> float:
    """Relative least-squares residual of ``target`` over the rows of ``atoms``."""
    m = target.double()
    basis = orthonormal_rows(atoms)
    return float((m - basis.T @ (basis @ m)).norm() / m.norm().clamp_min(1e-300))


def refine_texts(
    texts: list[list[int]],
    atoms: torch.Tensor,
    target: torch.Tensor,
    edits: Callable[[list[int]], list[list[int]]],
    gradients: Callable[[list[list[int]]], torch.Tensor],
    rounds: int = 4,
    min_gain: float = 1e-4,
    deadline: float | None = None,
) -> tuple[list[list[int]], torch.Tensor, list[float]]:
    """Coordinate descent over the chosen texts: for each slot, the ``edits`` of its text are scored by
    :func:`replacement_residuals` and the best is kept when it lowers the relative residual by at least
    ``min_gain``; a slot whose text changed is tried again next round. Stops after ``rounds`` rounds, when a
    round changes nothing, or at ``deadline`` (``time.perf_counter()``). Returns the texts, their atoms and the
    residual after each round (the first entry: before any edit)."""
    import time

    texts = [list(t) for t in texts]
    atoms = atoms.clone()
    history = [fit_residual(atoms, target)]
    active = set(range(len(texts)))
    for _ in range(rounds):
        changed: set[int] = set()
        for slot in sorted(active):
            if deadline is not None and time.perf_counter() > deadline:
                return texts, atoms, history + [fit_residual(atoms, target)]
            proposals = [p for p in edits(texts[slot]) if p and p != texts[slot]]
            if not proposals:
                continue
            cand = gradients(proposals).to(atoms.dtype)
            res = replacement_residuals(atoms, target, slot, cand)
            best = int(res.argmin())
            current = float(replacement_residuals(atoms, target, slot, atoms[slot : slot + 1])[0])
            if float(res[best]) < current - min_gain:
                texts[slot], atoms[slot] = proposals[best], cand[best]
                changed.add(slot)
        history.append(fit_residual(atoms, target))
        if not changed:
            break
        active = changed
    return texts, atoms, history


def ridged_inverse_sqrt(second: torch.Tensor, ridge: float) -> torch.Tensor:
    """(M + ridge × its top eigenvalue)^(−1/2) of a second-moment matrix (float64)."""
    evals, evecs = torch.linalg.eigh(second.double())
    evals = evals.clamp_min(0) + ridge * float(evals.max())
    return (evecs / evals.sqrt()) @ evecs.T


class KfacAtoms:
    """Texts' weight gradients on ``params`` (linear layers' ``.weight``), whitened as S^(−1/2) g A^(−1/2) with A
    and S the second moments of each layer's inputs and output gradients on text the model samples itself (a
    K-FAC metric, as in :mod:`leaklab.attacks.gradient.prefix`), flattened: Euclidean least squares on these
    vectors is least squares in the K-FAC metric. The per-position terms of all texts share a few strong
    directions, which otherwise decide every inner product with the observed gradient."""

    def __init__(self, loaded, params: list[str], ridge: float = 1e-2, samples: int = 16, length: int = 64) -> None:
        from leaklab.attacks.gradient.prefix import loss_terms, model_samples, second_moments

        self.loaded = loaded
        self.params = params
        self.modules = {p.rsplit(".", 1)[0]: loaded.model.get_submodule(p.rsplit(".", 1)[0]) for p in params}
        ids = model_samples(loaded, samples, length, seed=0)
        xx, dd = second_moments(loss_terms(loaded, self.modules, ids, torch.ones_like(ids, dtype=torch.bool)))
        self.a = {n: ridged_inverse_sqrt(m, ridge) for n, m in xx.items()}
        self.s = {n: ridged_inverse_sqrt(m, ridge) for n, m in dd.items()}

    def whiten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(dim,) the whitened, flattened weight gradients (``grads`` by parameter name, (out, in) each)."""
        return torch.cat([(self.s[n] @ grads[n + ".weight"].double() @ self.a[n]).flatten() for n in self.modules])

    def __call__(self, texts: list[list[int]], batch: int = 8) -> torch.Tensor:
        """(n, dim) each text's summed next-token-loss gradient, whitened."""
        from leaklab.attacks.gradient.prefix import loss_terms

        rows = []
        pad = self.loaded.tokenizer.pad_token_id or 0
        for s in range(0, len(texts), batch):
            part = texts[s : s + batch]
            width = max(len(t) for t in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long, device=self.loaded.device)
            mask = torch.zeros_like(ids)
            for i, t in enumerate(part):
                ids[i, : len(t)] = torch.tensor(t, device=ids.device)
                mask[i, : len(t)] = 1
            terms = loss_terms(self.loaded, self.modules, ids, mask.bool(), mask)
            for i in range(len(part)):
                g = {n + ".weight": terms.delta[n][i].double().T @ terms.x[n][i].double() for n in self.modules}
                rows.append(self.whiten(g))
        return torch.stack(rows)
