"""Per-setting views: every gradient attack sees a FedSGD-like view of the update, whatever the setting.

:func:`leaklab.attacks.base.run_attack` applies :func:`setting_view` before the attack and :func:`after_view`
after it, so ``somp``, ``dager`` and ``tokenset`` take any setting's update by their plain names.

The span attacks need, for layers 1 and 2, gradient blocks whose row space is the span of the batch's
attention inputs. Each setting reaches that view differently (:func:`fedsgd_view`):

* fedsgd: the update itself.
* fedavg: Δ = θ₀ − θ_k = η Σ_t ∇L(θ_t) ≈ kη ∇L(θ₀); we divide by kη (protocol facts in the flags). One step is
  exactly the FedSGD gradient; k > 1 steps are only approximately low-rank (the inputs X_t drift with θ_t).
* dpo / reward: the loss is a weighted sum over the chosen and the rejected sequence of each pair, so the
  gradient holds ``meta["sequences_per_pair"]`` (= 2) sequences per pair: the batch to recover is 2 × pairs.
  With shuffled rejected texts the two share a token set (the rejected one is a permutation).
* secagg: a sum over clients' batches: batch = clients × per-client batch; the inner setting's view applies.
* lora: only adapter gradients are shared. For W' = W + s·B·A on input X, ∂L/∂B = s·(∂L/∂W)·Aᵀ = s·Δᵀ(X Aᵀ):
  its rows lie in span{A x_i} ⊂ R^r. With P = Aᵀ(AAᵀ)⁻¹A, G' = ∂L/∂B·(AAᵀ)⁻¹A = s·Δᵀ X P has row space
  span{P x_i}; adding an orthonormal basis N of null(A) gives span{P x_i} ⊕ null(A), and a candidate x is
  in it iff A x ∈ span{A x_i}: the unchanged span check is exact when the batch's token count n < r (the
  rank is n + d − r < d), best effort (full rank) when n ≥ r. A is rebuilt from the seed in the meta (in a
  later federated round, with B, from the global adapter file). The same holds in every round: with B ≠ 0,
  ∂L/∂B = s·(∂L/∂W')·Aᵀ for the merged weight W' = W + s·B·A, so the view refers to the merged model
  (:func:`leaklab.threat.lora.merged_ref`), whose layer-1 inputs are the ones the batch produced. (∂L/∂A =
  s·Bᵀ(∂L/∂W') is then nonzero too; its rows lie in span{x_i} itself, but a delta of A, a tensor of
  Kaiming-scale entries moved by η²-small steps, is mostly float32 round-off: not used.) Saturation is
  read from the r leading singular values of G' (:func:`adapter_rank`).
* dropout on (``flags.train_mode``): where the model has active dropout (the GPT-2 family, p = 0.1) the
  client's masks perturb the span layers' inputs and the exact span checks fail: the span attacks then read
  'no signal' (:mod:`leaklab.attacks.gradient.dropout` has a first-layer check with the masks as unknowns);
  models without active dropout (the Llama family: ``attention_dropout`` 0) are unaffected. Recorded in the
  result's info.

Where no view exists (no first/second-layer attention gradient or LoRA pair) a :class:`LeaklabError` says so;
where the view exists but carries no information (LoRA rank saturated on both span layers) the view says so
and the attack is reported as 'no signal'.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from leaklab.attacks.gradient.subspace import numerical_rank
from leaklab.errors import LeaklabError
from leaklab.models.registry import load_model
from leaklab.threat.observation import Observation

if TYPE_CHECKING:
    from leaklab.attacks.base import Recovery

log = logging.getLogger(__name__)

#: layers whose attention gradients the span attacks read
SPAN_LAYERS = (0, 1)


def fedsgd_view(obs: Observation) -> tuple[Observation, dict[str, Any]]:
    """A FedSGD-like Observation carrying the same span information as ``obs``, and what was adapted."""
    setting, meta = obs.setting, obs.meta
    info: dict[str, Any] = {"setting": setting}
    if setting == "secagg":
        setting, meta = meta["inner_setting"], meta["inner_meta"]
        info["clients"] = obs.meta["clients"]
        info["inner_setting"] = setting
    grads = dict(obs.gradients)
    flags = obs.flags
    if flags.learning_rate is not None:
        scale = flags.learning_rate * flags.local_steps
        grads = {k: v / scale for k, v in grads.items()}
        info["delta_rescale"] = 1.0 / scale
        info["denoised_ranks"], tolerance = denoise_deltas(obs, grads, scale)
        if tolerance:
            info["span_tolerance"] = tolerance
        info["approximate"] = flags.local_steps > 1
    per_seq = int(meta.get("sequences_per_pair", 1)) if setting in ("dpo", "reward") else 1
    batch = obs.batch_size * per_seq if obs.batch_size is not None else None
    info["sequences_per_pair"] = per_seq
    model = obs.model
    if setting == "lora" or "lora" in meta:
        from leaklab.threat.lora import merged_ref

        grads, lora_info = lora_pseudo_gradients(obs, grads, meta["lora"])
        info["lora"] = lora_info
        model = merged_ref(obs.model, meta["lora"])
    if flags.train_mode:
        info["dropout"] = (
            "on: active dropout (e.g. GPT-2, p = 0.1) breaks exact span checks; none in Llama-family models"
        )
    paired = per_seq != 1
    view = Observation(
        model=model,
        setting="fedsgd",
        gradients=grads,
        flags=replace(
            flags,
            local_steps=1,
            learning_rate=None,
            num_clients=1,
            labels_known=flags.labels_known and not paired,
            lengths_known=flags.lengths_known and not paired,
        ),
        batch_size=batch,
        labels=None if paired else obs.labels,
        lengths=None if paired else obs.lengths,
        meta={k: v for k, v in obs.meta.items() if k == "defenses"}
        | ({"span_tolerance": info["span_tolerance"]} if "span_tolerance" in info else {}),
    )
    return view, info


#: a true input's distance to the denoised span is about √(d − k)/s_k (see :func:`denoise_deltas`); the span
#: checks accept up to this many times that
SPAN_NOISE_FACTOR = 2.0
#: the largest tolerance granted: a random input lies at ≈ 0.7 from a span of half the dimensions, so a noisier
#: span no longer separates the batch's inputs and the checks stay at their own thresholds
SPAN_TOLERANCE_MAX = 0.05


def denoise_deltas(
    obs: Observation, grads: dict[str, torch.Tensor], scale: float
) -> tuple[dict[int, int], dict[int, float]]:
    """Truncate each span layer's rescaled (Q, K, V) deltas jointly at the float32 round-off of θ_k = θ₀ − Δ.

    Δ/(kη) carries the rounding error of storing θ_k: entries of std σ ≈ ulp(θ_k)/(√12·kη), a dense full-rank
    matrix. Each block is whitened by its σ and the blocks are stacked; right singular vectors whose singular
    value exceeds 3(√M + √d) (the noise's spectral-norm scale) span the inputs, and every block is projected
    onto them (rank per layer returned). Without this a small learning rate makes every delta full rank. A
    protocol that adds known noise to Δ (SecAgg+'s stochastic quantisation) records its std per entry in
    ``meta["delta_noise_std"]``; it adds to σ.

    The cut span is the true one only up to the noise: a kept direction of (whitened) singular value s_j is
    tilted out of the true span by ≈ ‖P⊥Eᵀu_j‖/s_j ≈ √(d − k)/s_j (E the whitened noise, unit entries, in the
    d − k discarded dimensions), so a true input x lies at distance ≈ √(d − k)·(Σ_j (x·v_j)²/s_j²)^½ ≤
    √(d − k)/s_k from it. Where that exceeds the span checks' float32 thresholds (a protocol's noise, not
    round-off), the batch's weakest input (a text's last input token, whose only loss term predicts the final
    token) is rejected and the text decoded one token short; with such a recorded noise the second dict
    returns, per layer, the tolerance :data:`SPAN_NOISE_FACTOR`·√(d − k)/s_k that the span checks then use as
    their floor, unless above :data:`SPAN_TOLERANCE_MAX`. (Without a recorded noise it stays empty: several
    local steps make Δ only approximately low-rank, and the weak drift directions kept would loosen the checks
    for nothing.)
    """
    loaded = load_model(obs.model)
    params = dict(loaded.model.named_parameters())
    floor = float(obs.meta.get("delta_noise_std", 0.0)) / scale  # a protocol's known noise (SecAgg+ rounding)
    ranks, tolerance = {}, {}
    for layer in SPAN_LAYERS:
        names = [p.param for _, p in loaded.adapter.projections[layer]]
        names = [n for i, n in enumerate(names) if n in grads and n in params and n not in names[:i]]
        if not names:
            continue
        transposed = {p.param: p.transposed for _, p in loaded.adapter.projections[layer]}
        blocks = []
        for n in names:
            theta = params[n].detach() - grads[n] * scale
            ulp = (torch.nextafter(theta, torch.full_like(theta, float("inf"))) - theta).double()
            sigma = (float(ulp.pow(2).mean()) / 12 / scale**2 + floor**2) ** 0.5
            g = grads[n].double()
            blocks.append((g.t() if transposed[n] else g) / sigma)
        stack = torch.cat(blocks)
        _, sv, vh = torch.linalg.svd(stack, full_matrices=False)
        k = int((sv > 3.0 * (stack.shape[0] ** 0.5 + stack.shape[1] ** 0.5)).sum())
        proj = vh[:k].T @ vh[:k]
        for n in names:
            g = grads[n].double()
            grads[n] = ((g.t() @ proj).t() if transposed[n] else g @ proj).float()
        ranks[layer] = k
        tol = span_tolerance(sv, k, stack.shape[1]) if 0 < k < stack.shape[1] else 0.0
        if floor > 0 and tol <= SPAN_TOLERANCE_MAX:  # round-off alone: the span checks' own thresholds allow for it
            tolerance[layer] = tol
    return ranks, tolerance


def span_tolerance(singular_values: torch.Tensor, k: int, d: int) -> float:
    """:data:`SPAN_NOISE_FACTOR`·√(d − k)/s_k: how far a true input may lie from the rank-``k`` span of a
    (M x d) matrix whose noise has unit entries (singular values descending; see :func:`denoise_deltas`)."""
    return SPAN_NOISE_FACTOR * (d - k) ** 0.5 / float(singular_values[k - 1])


def lora_pseudo_gradients(
    obs: Observation, grads: dict[str, torch.Tensor], lora_meta: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Base-weight pseudo-gradients whose (Q, K, V) row space per layer is span{P x_i} ⊕ null(A)."""
    from leaklab.threat.lora import lora_model

    loaded = load_model(obs.model)
    adapted = dict(lora_model(obs.model, lora_meta).named_parameters())
    out: dict[str, torch.Tensor] = {}
    used = {}
    ranks: dict[int, int] = {}
    saturated: list[int] = []
    for layer in SPAN_LAYERS:
        proj = loaded.adapter.projections[layer]
        blocks: dict[str, torch.Tensor] = {}
        pair = _lora_pair(proj, adapted, grads)
        if pair is None:
            raise LeaklabError(
                f"the LoRA update has no adapter on layer {layer}'s attention projections "
                f"(targets {lora_meta.get('targets')}): no span check applies"
            )
        key, a, grad_b, rows = pair
        a = a.detach().double()
        g = grad_b.double()[rows[0] : rows[1]] @ torch.linalg.solve(a @ a.T, a)  # s·Δᵀ X P (out x d)
        ranks[layer] = adapter_rank(g, a.shape[0])
        if ranks[layer] >= a.shape[0]:
            saturated.append(layer)
        _, _, vh = torch.linalg.svd(a, full_matrices=True)
        null = vh[a.shape[0] :]  # orthonormal basis of null(A), (d − r) x d
        used[layer] = key
        for slot, p in proj:
            if slot == key:
                blocks[slot] = g
            elif slot == "q" or (key == "q" and slot == "k"):
                blocks[slot] = _fit_rows(null, p.rows[1] - p.rows[0])
            else:
                blocks[slot] = torch.zeros(p.rows[1] - p.rows[0], a.shape[1], dtype=torch.float64)
        _place(out, proj, blocks, loaded)
    if saturated:  # span{A x_i} is all of R^r: every candidate passes, the span checks carry no information
        msg = (
            f"the LoRA adapter gradient has full rank r = {int(lora_meta['r'])} on layer(s) {saturated}: the batch "
            "has at least r tokens, so span checks cannot separate the batch's inputs from others (expect nothing)"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    info = {"r": int(lora_meta["r"]), "projection": used, "exact_if_tokens_below": int(lora_meta["r"])}
    return out, {**info, "adapter_ranks": ranks, "saturated_layers": saturated}


def adapter_rank(pseudo: torch.Tensor, r: int) -> int:
    """Numerical rank of a LoRA pseudo-gradient G' = ∂L/∂B·(AAᵀ)⁻¹A (out x d), which has rank ≤ r by
    construction: only its r leading singular values are read. Beyond r they are float64 round-off of exact
    zeros (≈ 1e-16·σ₁), and their drop from the float32 round-off that the shared ∂L/∂B carries in the
    directions of R^r no input spans (≈ 1e-8·σ₁) would always be the largest gap, so the rank would read r
    (saturated) whenever out > r, whatever the batch's token count."""
    return numerical_rank(torch.linalg.svdvals(pseudo)[:r])


def _lora_pair(proj, adapted: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor]):
    """(slot, A, ∂L/∂B, output rows) of the first adapted projection among V, K, Q of a layer."""
    for slot in ("v", "k", "q"):
        p = getattr(proj, slot)
        module = p.param.removesuffix(".weight")
        name_a = f"base_model.model.{module}.lora_A.default.weight"
        name_b = f"base_model.model.{module}.lora_B.default.weight"
        if name_b in grads and name_a in adapted:
            return slot, adapted[name_a], grads[name_b], p.rows
    return None


def _fit_rows(m: torch.Tensor, rows: int) -> torch.Tensor:
    """``m`` cut or zero-padded to ``rows`` rows (row space kept when rows ≥ m's rows)."""
    if m.shape[0] > rows:
        raise LeaklabError(f"projection has {rows} outputs, fewer than the {m.shape[0]}-dim null space of A")
    return torch.cat([m, m.new_zeros(rows - m.shape[0], m.shape[1])])


def _place(out: dict[str, torch.Tensor], proj, blocks: dict[str, torch.Tensor], loaded) -> None:
    """Write (out x in) blocks into base-parameter-shaped tensors (fused QKV and Conv1D layouts handled)."""
    params = dict(loaded.model.named_parameters())
    for slot, p in proj:
        if p.param not in out:
            shape = params[p.param].shape
            out[p.param] = torch.zeros(shape, dtype=torch.float64)
        full = out[p.param].t() if p.transposed else out[p.param]
        full[p.rows[0] : p.rows[1]] = blocks[slot]
    for k in list(out):
        out[k] = out[k].float()


def setting_view(obs: Observation) -> tuple[Observation, dict[str, Any]]:
    """:func:`fedsgd_view`, plus ``info["no_signal"]`` (the reason) when the view carries no information."""
    view, info = fedsgd_view(obs)
    saturated = info.get("lora", {}).get("saturated_layers", [])
    if len(saturated) == len(SPAN_LAYERS):
        info["no_signal"] = (
            f"the LoRA adapter gradient is saturated (rank r = {info['lora']['r']} on layers {saturated}: the batch "
            "has at least r tokens), so span checks cannot tell the batch's inputs from any other"
        )
    return view, info


def after_view(obs: Observation, rec: Recovery, info: dict[str, Any]) -> Recovery:
    """Setting-specific clean-up of a recovery: shuffle-paired preference data keeps one text per pair; LoRA
    texts get their final token (:func:`complete_lora_final_tokens`)."""
    meta = obs.meta.get("inner_meta", obs.meta)
    if rec.kind == "texts" and info["sequences_per_pair"] > 1 and meta.get("pairing") == "shuffle" and rec.token_ids:
        rec = keep_fluent_of_permutations(obs, rec)
        info["kept_of_permutation_groups"] = len(rec.texts)
    if rec.kind == "texts" and rec.token_ids and "lora" in info and not info["lora"]["saturated_layers"]:
        rec = complete_lora_final_tokens(obs, rec, info)
    return rec


#: the public LM's next-token guesses tried per text, at most this many texts, and the evidence (see
#: :func:`_best_guess`) a guess needs to be appended
LORA_FINAL_TOP, LORA_FINAL_MAX_TEXTS, LORA_FINAL_EVIDENCE = 8, 16, 0.8


def complete_lora_final_tokens(obs: Observation, rec: Recovery, info: dict[str, Any]) -> Recovery:
    """Append each recovered text's final token from a LoRA update.

    A text's final token is only a prediction target: the span attacks read it from the output-embedding
    gradient, which a LoRA update does not carry, so their texts end one token short. It still shapes the
    update: it sets the loss gradient at the text's last input position, which flows into every attention
    weight. Each text's summed-loss gradient of the layer-0/1 adapted projections (on the merged model,
    projected like the update: G·P, P = Aᵀ(AAᵀ)⁻¹A) is computed once per guess among the public LM's
    :data:`LORA_FINAL_TOP` next tokens; the batch's gradient is their sum, so choices are compared against the
    observed pseudo-gradient at no further cost, by the relative residual after the best scale (the recovered
    batch may differ from the true one). Coordinate passes set each text's guess with the others at theirs; a
    guess is appended when its evidence over the runner-up (:func:`_best_guess`) reaches
    :data:`LORA_FINAL_EVIDENCE`, else the text keeps its recovered tokens (the LM did not guess its final
    token). Next-token task; at most :data:`LORA_FINAL_MAX_TEXTS` texts (one forward/backward pass per text and
    guess)."""
    from leaklab.threat.lora import lora_model, merged_ref

    lmeta = obs.meta.get("lora") or obs.meta.get("inner_meta", {}).get("lora")
    ids = [list(t) for t in rec.token_ids or []]
    if obs.model.task != "next-token" or not ids or len(ids) > LORA_FINAL_MAX_TEXTS or min(map(len, ids)) == 0:
        return rec
    loaded = load_model(merged_ref(obs.model, lmeta))
    adapted = dict(lora_model(obs.model, lmeta).named_parameters())
    targets, observed = _lora_final_targets(loaded, adapted, obs.gradients)
    guesses, atoms = [], []  # per text: the LM's guesses and the projected gradient with each appended
    for t in ids:
        top = lm_guesses(loaded, t, LORA_FINAL_TOP)
        guesses.append(top)
        atoms.append(torch.stack([_projected_gradient(loaded, targets, t + [y]) for y in top]))

    def fit(choice: list[int]) -> tuple[torch.Tensor, float]:
        """The residual of the batch's gradient after its best scale, and that scale."""
        v = sum(atoms[i][c] for i, c in enumerate(choice))
        scale = float(v @ observed) / max(float(v @ v), 1e-300)
        return observed - scale * v, scale

    choice, evidence = [0] * len(ids), [0.0] * len(ids)
    for _ in range(2):
        for i in range(len(ids)):
            choice[i], evidence[i] = _best_guess(atoms[i], choice, i, fit)
    appended = [e >= LORA_FINAL_EVIDENCE for e in evidence]
    out = [t + [g[c]] if ok else t for t, g, c, ok in zip(ids, guesses, choice, appended, strict=True)]
    info["lora_final_tokens"] = {
        "appended": sum(appended),
        "texts": len(ids),
        "guesses_per_text": LORA_FINAL_TOP,
        "residual": float(fit(choice)[0].norm() / observed.norm()),
    }
    return replace(rec, texts=[loaded.decode(t) for t in out], token_ids=out)


def _best_guess(atoms: torch.Tensor, choice: list[int], i: int, fit) -> tuple[int, float]:
    """Text ``i``'s best guess (the others fixed) and the evidence for it over the runner-up: the drop in squared
    residual from runner-up to best as a share of their own difference ‖c·(v_r − v_b)‖² (c the fitted scale).
    It is ≈ 1 when the best guess is the text's final token, whatever the other texts' errors add (they are
    nearly orthogonal to that difference), and near 0 or below when neither guess is."""
    trials = sorted((float(fit([*choice[:i], k, *choice[i + 1 :]])[0].pow(2).sum()), k) for k in range(len(atoms)))
    if len(trials) < 2:
        return trials[0][1], 0.0
    (best, b), (runner, r) = trials[0], trials[1]
    scale = fit([*choice[:i], b, *choice[i + 1 :]])[1]
    gap = float((scale * (atoms[r] - atoms[b])).pow(2).sum())
    return b, (runner - best) / max(gap, 1e-300)


@torch.no_grad()
def lm_guesses(loaded, ids: list[int], k: int) -> list[int]:
    """The public LM's ``k`` most likely next tokens after ``ids``."""
    logits = loaded.model(input_ids=torch.tensor([ids], device=loaded.device)).logits[0, -1]
    return torch.topk(logits, k).indices.tolist()


def _lora_final_targets(loaded, adapted, grads: dict[str, torch.Tensor]) -> tuple[list[tuple], torch.Tensor]:
    """Per span layer (base parameter, output rows, transposed, P) of its adapted projection, and the observed
    pseudo-gradients ∂L/∂B·(AAᵀ)⁻¹A flattened into one vector."""
    targets, observed = [], []
    for layer in SPAN_LAYERS:
        proj = loaded.adapter.projections[layer]
        key, a, grad_b, rows = _lora_pair(proj, adapted, grads)
        a = a.detach().double()
        solve = torch.linalg.solve(a @ a.T, a)
        p = getattr(proj, key)
        targets.append((p.param, rows, p.transposed, a.T @ solve))
        observed.append((grad_b.double()[rows[0] : rows[1]] @ solve).flatten())
    return targets, torch.cat(observed)


def _projected_gradient(loaded, targets: list[tuple], ids: list[int]) -> torch.Tensor:
    """G·P of one text's summed next-token loss for each target projection, flattened."""
    params = dict(loaded.model.named_parameters())
    x = torch.tensor([ids], device=loaded.device)
    loss = loaded.model(input_ids=x, labels=x).loss * (len(ids) - 1)
    grads = torch.autograd.grad(loss, [params[t[0]] for t in targets])
    parts = []
    for (_, rows, transposed, proj), g in zip(targets, grads, strict=True):
        g = (g.t() if transposed else g).double()[rows[0] : rows[1]]  # noqa: PLW2901
        parts.append((g @ proj).flatten().cpu())
    return torch.cat(parts)


def keep_fluent_of_permutations(obs: Observation, rec: Recovery, overlap: float = 0.6) -> Recovery:
    """Shuffle-paired preference data: a rejected text is a permutation of its chosen one. Going through the
    recovered sequences from most to least likely under the public LM, keep one unless its token multiset
    overlaps a kept one by ≥ ``overlap`` (|a ∩ b| / max(|a|, |b|)): that is its pair's permutation."""
    from collections import Counter

    from leaklab.models.registry import ModelRef

    lm = load_model(ModelRef(obs.model.name, "next-token", init_seed=obs.model.init_seed))
    ids = rec.token_ids or []
    order = sorted(range(len(ids)), key=lambda i: _nll(lm, ids[i]))
    keep: list[int] = []
    for i in order:
        bag = Counter(ids[i])
        if all(sum((bag & Counter(ids[j])).values()) < overlap * max(len(ids[i]), len(ids[j]), 1) for j in keep):
            keep.append(i)
    keep.sort()
    return replace(rec, texts=[rec.texts[i] for i in keep], token_ids=[ids[i] for i in keep])


@torch.no_grad()
def _nll(lm, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood of ``ids`` under the language model."""
    if len(ids) < 2:
        return 0.0
    x = torch.tensor([ids])
    return float(lm.model(input_ids=x, labels=x).loss)
