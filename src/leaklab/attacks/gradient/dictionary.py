"""Per-candidate-sentence gradients (OMP atoms), restricted to the layers that carry the signal.

For a linear layer, sample b's weight gradient is G_b = Δ_bᵀ X_b: the output gradients Δ_b and inputs X_b
of its own tokens. One batched forward/backward over the candidates (summed loss) with hooks on the first
two layers' attention projections gives every candidate's gradient on those layers at once. Atoms are
compared with the observed gradient on a fixed, seeded subset of coordinates (a coordinate sketch that keeps
memory bounded; inner products on it are unbiased up to a common scale).
"""

from __future__ import annotations

import warnings

import torch

from leaklab.models.device import chunk_rows
from leaklab.models.registry import LoadedModel
from leaklab.threat.observation import Observation

SKETCH = 1 << 17  # coordinates kept per atom
#: next-token atoms: the LM head's softmax term once per distinct prefix (:func:`head_input_gradients`); a
#: benchmark and the reference test turn it off (a loss over every atom's full logits)
SHARED_SOFTMAX = True
#: config fields of families whose logits are post-processed after the head (the shortcut would miss it)
LOGIT_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def signal_params(loaded: LoadedModel, layers: tuple[int, ...] = (0, 1)) -> list[str]:
    """Attention-projection parameters of ``layers`` (fused QKV counted once)."""
    names: list[str] = []
    for layer in layers:
        for _, proj in loaded.adapter.projections[layer]:
            if proj.param not in names:
                names.append(proj.param)
    return names


def sketch_index(
    obs: Observation, params: list[str], size: int = SKETCH, seed: int = 0, kept_only: bool = False
) -> dict[str, torch.Tensor]:
    """A seeded random subset of each parameter's flattened coordinates, ~``size`` in total (CPU: drawn from a
    CPU generator, so the subset is the same on every device). ``kept_only``: drawn from the coordinates the
    update kept (its non-zero ones: a sparsified update's dropped coordinates carry no evidence)."""
    pools = {p: _pool(obs.gradients[p], kept_only) for p in params}
    total = sum(int(pool.numel()) for pool in pools.values()) or 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for p, pool in pools.items():
        n = int(pool.numel())
        k = min(n, max(1, round(size * n / total)))
        out[p] = pool[torch.randperm(n, generator=gen, device="cpu")[:k]].sort().values
    return out


def _pool(grad: torch.Tensor, kept_only: bool) -> torch.Tensor:
    if kept_only:
        return torch.nonzero(grad.detach().flatten().cpu()).flatten()
    return torch.arange(grad.numel(), device="cpu")


def observed_vector(obs: Observation, index: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """The observed gradient on the sketch's coordinates (float64, on ``device``)."""
    parts = [obs.gradients[p].flatten()[i.to(obs.gradients[p].device)] for p, i in index.items()]
    return torch.cat(parts).to(device, torch.float64)


def sentence_gradients(
    loaded: LoadedModel,
    sentences: list[list[int]],
    labels: list[int] | None,
    index: dict[str, torch.Tensor],
    batch: int | None = None,
    head_means: dict[tuple[int, ...], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(n, sketch) gradient of each sentence's summed loss (next-token: over its targets; classify: its
    label), restricted to ``index``'s coordinates, on the model's device. Sentences are right-padded; pads
    carry no gradient. ``batch`` sentences go through each forward/backward (default: from the device's free
    memory, :func:`sentence_bytes`; at most 8). ``head_means``: a cache of Wᵀ p per prefix kept by the caller
    across calls (:func:`head_input_gradients`)."""
    model = loaded.model
    modules = {p: model.get_submodule(p.rsplit(".", 1)[0]) for p in index}
    batch = batch or chunk_rows(sentence_bytes(loaded, modules, sentences), loaded.device, most=8)
    shared = None
    if shared_softmax_applies(loaded):
        shared = head_means if head_means is not None else {}
    rows: list[torch.Tensor] = []
    for s in range(0, len(sentences), batch):
        part = sentences[s : s + batch]
        labs = labels[s : s + batch] if labels is not None else None
        rows.append(_batch_gradients(loaded, modules, index, part, labs, shared))
    return torch.cat(rows)


def shared_softmax_applies(loaded: LoadedModel) -> bool:
    """The head shortcut holds for a next-token model whose logits are its linear head's output."""
    head = loaded.model.get_output_embeddings()
    cfg = loaded.model.config
    plain = not any(getattr(cfg, f, None) for f in LOGIT_POSTPROCESS)
    return SHARED_SOFTMAX and loaded.ref.task == "next-token" and isinstance(head, torch.nn.Linear) and plain


def head_input_gradients(
    loaded: LoadedModel, h: torch.Tensor, ids: torch.Tensor, lengths: list[int], shared: dict, open_end: bool = False
) -> torch.Tensor:
    """∂L/∂h of the summed next-token loss at the head's inputs h (b, width, d): Wᵀ p_t − W[y_t] at each
    position with a target, 0 elsewhere. Wᵀ p_t depends on the tokens up to t only, so it is computed once per
    distinct prefix (alternatives of a text share all of theirs) and kept in ``shared``: the vocabulary-wide
    softmax runs per prefix, not per atom. ``open_end``: each sentence's last position is scored too, its
    target unknown (only its log-partition term, Wᵀ p_t)."""
    head = loaded.model.get_output_embeddings()
    weight = head.weight
    scored = [n if open_end else n - 1 for n in lengths]
    keys = [(i, t, tuple(ids[i, : t + 1].tolist())) for i, n in enumerate(scored) for t in range(n)]
    todo = list({k: (i, t) for i, t, k in keys if k not in shared}.items())
    step = chunk_rows(weight.shape[0] * 4 * 3, weight.device, most=1024)  # logits, softmax, their product
    with torch.no_grad():
        for s in range(0, len(todo), step):
            part = todo[s : s + step]
            rows = torch.stack([h[i, t] for _, (i, t) in part]).to(weight.dtype)
            probs = torch.softmax(head(rows).float(), dim=-1)
            for (key, _), mean in zip(part, probs @ weight.float(), strict=True):
                shared[key] = mean
    grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for i, t, key in keys:
        grad[i, t] = shared[key]
        if t + 1 < lengths[i]:
            grad[i, t] -= weight[ids[i, t + 1]].detach().float()
    return grad


def head_inputs(
    loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """The head's inputs (with their autograd graph) from a forward pass that stops before the head (from
    the input embeddings ``embeds`` when given)."""
    captured: list[torch.Tensor] = []

    def stop(_mod, args):
        captured.append(args[0])
        raise _HeadReached

    handle = loaded.model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        if embeds is None:
            loaded.model(input_ids=ids, attention_mask=mask)
        else:
            loaded.model(inputs_embeds=embeds, attention_mask=mask)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    return captured[0]


class _HeadReached(Exception):
    """Raised by the head's pre-hook to end a forward pass there."""


def sentence_bytes(loaded: LoadedModel, modules: dict, sentences: list[list[int]]) -> int:
    """Memory one sentence takes in :func:`sentence_gradients`: its float32 logits and their gradient over the
    vocabulary, every layer's activations kept for the backward pass, and its float64 per-sentence weight
    gradients of the signal layers (with their inputs and output gradients)."""
    width = max((len(t) for t in sentences), default=1)
    cfg = loaded.adapter
    vocab = cfg.embeddings.num_embeddings
    activations = 16 * width * cfg.hidden_size * cfg.num_layers
    weights = sum(m.weight.numel() for m in modules.values())
    return 4 * (3 * width * vocab + activations) + 8 * 2 * weights


def _batch_gradients(loaded, modules, index, sentences, labels, shared=None) -> torch.Tensor:
    model, device = loaded.model, loaded.device
    width = max(len(t) for t in sentences)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.full((len(sentences), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(sentences):
        ids[i, : len(t)] = torch.tensor(t, device=device)
        mask[i, : len(t)] = 1
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: inputs.__setitem__(n, a[0].detach())))
        handles.append(mod.register_full_backward_hook(lambda m, gi, go, n=name: grads.__setitem__(n, go[0].detach())))
    wanted = {id(mod.weight) for mod in modules.values()}
    frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
    for p in frozen:  # only the signal layers' weight gradients are needed: skip all others
        p.requires_grad_(False)
    try:
        model.zero_grad(set_to_none=True)
        if shared is not None:
            hidden = head_inputs(loaded, ids, mask)
            dh = head_input_gradients(loaded, hidden.detach(), ids, [len(t) for t in sentences], shared)
            roots, seeds = [hidden], [dh.to(hidden.dtype)]
        else:
            roots, seeds = (
                [_summed_loss(loaded, model(input_ids=ids, attention_mask=mask).logits, ids, mask, labels)],
                None,
            )
        with warnings.catch_warnings():  # the hooks fire on module outputs only: that is what we need
            warnings.simplefilter("ignore", UserWarning)
            torch.autograd.backward(roots, seeds)
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    return _collect(modules, index, inputs, grads, len(sentences), device)


def _summed_loss(loaded, logits, ids, mask, labels) -> torch.Tensor:
    """The batch's summed loss: next-token over every target, or each sentence's label."""
    logits = logits.float()
    if loaded.ref.task == "next-token":
        target = ids.masked_fill(mask == 0, -100)[:, 1:]
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=-100, reduction="sum")
    return torch.nn.functional.cross_entropy(logits, torch.tensor(labels, device=ids.device), reduction="sum")


def _collect(modules, index, inputs, grads, n: int, device) -> torch.Tensor:
    """Each sentence's weight gradients G_b = Δ_bᵀ X_b of the signal layers at the sketch's coordinates."""
    cols = []
    for name, idx in index.items():
        x, delta = inputs[name].double(), grads[name].double()
        transposed = type(modules[name]).__name__ == "Conv1D"
        g = torch.einsum("bti,bto->bio", x, delta) if transposed else torch.einsum("bto,bti->boi", delta, x)
        cols.append(g.reshape(n, -1)[:, idx.to(device)])
    return torch.cat(cols, dim=1).float()
