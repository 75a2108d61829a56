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


def signal_params(loaded: LoadedModel, layers: tuple[int, ...] = (0, 1)) -> list[str]:
    """Attention-projection parameters of ``layers`` (fused QKV counted once)."""
    names: list[str] = []
    for layer in layers:
        for _, proj in loaded.adapter.projections[layer]:
            if proj.param not in names:
                names.append(proj.param)
    return names


def sketch_index(obs: Observation, params: list[str], size: int = SKETCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random subset of each parameter's flattened coordinates, ~``size`` in total (CPU: drawn from a
    CPU generator, so the subset is the same on every device)."""
    total = sum(obs.gradients[p].numel() for p in params)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for p in params:
        n = obs.gradients[p].numel()
        k = min(n, max(1, round(size * n / total)))
        out[p] = torch.randperm(n, generator=gen, device="cpu")[:k].sort().values
    return out


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
) -> torch.Tensor:
    """(n, sketch) gradient of each sentence's summed loss (next-token: over its targets; classify: its
    label), restricted to ``index``'s coordinates, on the model's device. Sentences are right-padded; pads
    carry no gradient. ``batch`` sentences go through each forward/backward (default: from the device's free
    memory, :func:`sentence_bytes`; at most 8)."""
    model = loaded.model
    modules = {p: model.get_submodule(p.rsplit(".", 1)[0]) for p in index}
    batch = batch or chunk_rows(sentence_bytes(loaded, modules, sentences), loaded.device, most=8)
    rows: list[torch.Tensor] = []
    for s in range(0, len(sentences), batch):
        part = sentences[s : s + batch]
        labs = labels[s : s + batch] if labels is not None else None
        rows.append(_batch_gradients(loaded, modules, index, part, labs))
    return torch.cat(rows)


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


def _batch_gradients(loaded, modules, index, sentences, labels) -> torch.Tensor:
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
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits.float()
        if loaded.ref.task == "next-token":
            target = ids.masked_fill(mask == 0, -100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        else:
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, device=device), reduction="sum")
        with warnings.catch_warnings():  # the hooks fire on module outputs only: that is what we need
            warnings.simplefilter("ignore", UserWarning)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    cols = []
    for name, idx in index.items():
        x, delta = inputs[name].double(), grads[name].double()
        transposed = type(modules[name]).__name__ == "Conv1D"
        g = torch.einsum("bti,bto->bio", x, delta) if transposed else torch.einsum("bto,bti->boi", delta, x)
        cols.append(g.reshape(len(sentences), -1)[:, idx.to(device)])
    return torch.cat(cols, dim=1).float()
