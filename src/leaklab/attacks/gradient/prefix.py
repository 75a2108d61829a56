"""Prefix evidence over every linear layer of the transformer blocks (FedSpy-style), in a K-FAC metric.

In a causal LM the loss term at position t depends only on the tokens up to t + 1. So the gradient of a
text's loss terms over positions [s, L) — computed on the text cut after its L-th token — is an exact additive
part of the text's gradient, and so of the batch's, over all parameters: a candidate continuation of a known
prefix can be held against the observed gradient G whatever the rank of one layer.

A linear layer's weight gradient of a candidate is g = Σ_t δ_t x_tᵀ (output gradients δ, inputs x; every
position up to L, since the later loss terms reach the prefix through attention). The per-position terms of all
texts share a few strong directions, which otherwise decide any inner product with G; the candidate is scored
in the metric of the layers' input and output-gradient second moments A and S (a K-FAC metric, from text the
model samples itself): ⟨G, g⟩ = tr(Gᵀ S⁻¹ g A⁻¹) = Σ_t δ_tᵀ S⁻¹ G A⁻¹ x_t and ‖g‖² = Σ_{t,t'} (δ_tᵀ S⁻¹ δ_t')
(x_tᵀ A⁻¹ x_t'), summed over the layers, without forming any candidate's weight gradient. The embedding and
the LM head are left out: the head's gradient is what SOMP's output-gradient filter reads.

The exact score of one candidate token needs a backward over its whole prefix. :func:`next_token_terms` keeps
only the prefix's last position's terms δ_s x_sᵀ (the earlier positions' keys and values held fixed, from a
KV cache): one token per candidate, all candidates of a prefix in one batched backward;
:class:`NextTokenRescorer` scores them for SOMP's decoder (option ``prefix_rescore``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from leaklab.models.registry import LoadedModel


def block_linears(loaded: LoadedModel) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of the model but the output head, by module name (weight: ``name + '.weight'``)."""
    head = loaded.model.get_output_embeddings()
    return {n: m for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


@dataclass
class Terms:
    """Per row of a batch: each linear module's inputs x (n, t, in) and output gradients δ (n, t, out)."""

    x: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]


def _capture(modules: dict[str, torch.nn.Linear]) -> tuple[dict, dict, list]:
    """Hooks that store each module's input x and output gradient δ (detached) by name; remove the handles."""
    xs: dict[str, torch.Tensor] = {}
    ds: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: xs.__setitem__(n, a[0].detach())))
        handles.append(mod.register_full_backward_hook(lambda m, gi, go, n=name: ds.__setitem__(n, go[0].detach())))
    return xs, ds, handles


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without the warning that the :func:`_capture` hooks see module outputs only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss.backward()


def loss_terms(
    loaded: LoadedModel,
    modules: dict[str, torch.nn.Linear],
    ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> Terms:
    """Inputs and output gradients of ``modules`` for each row's summed next-token loss over the tokens where
    ``targets`` (n, L) is True (a token at j is predicted from position j − 1; position 0 is never a target).
    One batched backward: the rows do not interact, so each row's δ is its own loss's."""
    model = loaded.model
    mask = torch.ones_like(ids) if mask is None else mask
    xs, ds, handles = _capture(modules)
    try:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(~targets[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        _backward(loss)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    keep = mask.unsqueeze(-1).float()
    return Terms({n: xs[n].float() * keep for n in modules}, {n: ds[n].float() * keep for n in modules})


def weight_gradients(terms: Terms) -> dict[str, torch.Tensor]:
    """Σ over rows and positions of δ xᵀ: the modules' weight gradients of the rows' summed loss."""
    return {n: torch.einsum("bto,bti->oi", terms.delta[n], terms.x[n]) for n in terms.x}


@dataclass
class KfacMetric:
    """Per module A⁻¹ (inputs) and S⁻¹ (output gradients); ``None`` entries are the identity."""

    a_inv: dict[str, torch.Tensor | None]
    s_inv: dict[str, torch.Tensor | None]

    @classmethod
    def identity(cls, names: list[str]) -> KfacMetric:
        """The Euclidean metric (the plain cosine)."""
        return cls(dict.fromkeys(names), dict.fromkeys(names))

    @classmethod
    def from_terms(cls, terms: Terms, ridge: float) -> KfacMetric:
        """(M + ridge × its top eigenvalue)⁻¹ of the second moments M of x and δ over the terms' positions."""
        return cls.from_moments(*second_moments(terms), ridge)

    @classmethod
    def from_moments(cls, xx: dict[str, torch.Tensor], dd: dict[str, torch.Tensor], ridge: float) -> KfacMetric:
        """From per-module second moments of x and δ (:func:`second_moments`, summed over batches if wanted:
        the scale does not matter)."""
        return cls(
            {n: _ridged_inverse(m, ridge) for n, m in xx.items()}, {n: _ridged_inverse(m, ridge) for n, m in dd.items()}
        )

    def left(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """v S⁻¹ (rows of v: output-gradient vectors of module ``name``)."""
        s = self.s_inv[name]
        return v if s is None else v @ s

    def right(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """v A⁻¹ (rows of v: input vectors of module ``name``)."""
        a = self.a_inv[name]
        return v if a is None else v @ a

    def inner(self, name: str, g: torch.Tensor, h: torch.Tensor) -> float:
        """tr(gᵀ S⁻¹ h A⁻¹) of two (out, in) matrices."""
        return float((self.left(name, g.T.float()).T.double() * self.right(name, h.float()).double()).sum())


def second_moments(terms: Terms) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module Σ x xᵀ and Σ δ δᵀ (float32: a model has many of them) over every row and position."""

    def moment(v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(-1, v.shape[-1])
        return flat.T @ flat

    return {n: moment(x) for n, x in terms.x.items()}, {n: moment(d) for n, d in terms.delta.items()}


def _ridged_inverse(second: torch.Tensor, ridge: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(second.double())
    evals = evals.clamp_min(0) + ridge * float(evals.max())
    return ((evecs / evals) @ evecs.T).float()


class PrefixScorer:
    """Scores candidate continuations (their :class:`Terms`) against a target gradient G (per module, (out,
    in)) in a :class:`KfacMetric`: ⟨G, g⟩ and ‖g‖², summed over the modules."""

    def __init__(self, target: dict[str, torch.Tensor], metric: KfacMetric) -> None:
        self.metric = metric
        # G̃ = S⁻¹ G A⁻¹, so that ⟨G, g⟩ = Σ_t δ_tᵀ G̃ x_t
        self.white = {n: metric.right(n, metric.left(n, g.T.float()).T) for n, g in target.items()}
        self.norm = sum(metric.inner(n, g, g) for n, g in target.items()) ** 0.5

    def inner(self, terms: Terms) -> torch.Tensor:
        """(n,) ⟨G, g_row⟩ in the metric."""
        return sum(((terms.delta[n] @ w) * terms.x[n]).double().sum(dim=(1, 2)) for n, w in self.white.items())

    def norms2(self, terms: Terms) -> torch.Tensor:
        """(n,) ‖g_row‖² in the metric, from the positions' Gram matrices."""
        out = 0.0
        for n in self.white:
            gx = self.metric.right(n, terms.x[n]) @ terms.x[n].transpose(1, 2)
            gd = self.metric.left(n, terms.delta[n]) @ terms.delta[n].transpose(1, 2)
            out = out + (gx.double() * gd.double()).sum(dim=(1, 2))
        return out

    def cosines(self, terms: Terms) -> torch.Tensor:
        """(n,) cos(G, g_row) in the metric."""
        return self.inner(terms) / (self.norms2(terms).clamp_min(1e-300).sqrt() * max(self.norm, 1e-300))

    def next_cosines(self, terms: NextTerms) -> torch.Tensor:
        """(n, k) cos(G, g) in the metric of each candidate's own terms (:func:`next_token_terms`): one
        position, so ⟨G, g⟩ = δᵀ (G̃ x) with G̃ x once per prefix, and ‖g‖² = (δᵀ S⁻¹ δ)(xᵀ A⁻¹ x)."""
        inner, norms2 = 0.0, 0.0
        for n, w in self.white.items():
            x, d = terms.x[n], terms.delta[n]
            inner = inner + (d.double() * (x @ w.T).double().unsqueeze(1)).sum(-1)
            xx = (self.metric.right(n, x) * x).double().sum(-1)
            dd = (self.metric.left(n, d) * d).double().sum(-1)
            norms2 = norms2 + dd * xx.unsqueeze(1)
        return inner / (norms2.clamp_min(1e-300).sqrt() * max(self.norm, 1e-300))


def explain_away(
    target: dict[str, torch.Tensor], known: dict[str, torch.Tensor], metric: KfacMetric
) -> tuple[dict[str, torch.Tensor], float]:
    """G − α K with α = ⟨G, K⟩ / ‖K‖² in the metric (the known texts' exact terms, e.g. confirmed prefixes,
    fitted by least squares: the batch's token count, the 1/N of the mean loss, is not observed)."""
    kk = sum(metric.inner(n, k, k) for n, k in known.items())
    alpha = sum(metric.inner(n, target[n], k) for n, k in known.items()) / max(kk, 1e-300)
    return {n: target[n] - alpha * known[n].to(target[n].dtype) for n in target}, alpha


def model_samples(loaded: LoadedModel, n: int, length: int, seed: int) -> torch.Tensor:
    """(n, 1 + length) token ids sampled from the model itself (temperature 1) after its BOS token."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
    gen = torch.Generator(device=loaded.device).manual_seed(seed)
    from transformers import DynamicCache

    seqs = torch.full((n, 1), bos, dtype=torch.long, device=loaded.device)
    cache = DynamicCache()
    for _ in range(length):
        logits = loaded.model(seqs[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs


@dataclass
class NextTerms:
    """A next token's own terms for n prefixes and k candidate tokens each: per module the inputs x (n, in) at
    the prefix's last position (shared by its candidates) and the output gradients δ (n, k, out) there of each
    candidate's loss −log p(c | prefix)."""

    x: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]

    def as_terms(self) -> Terms:
        """The same terms as :class:`Terms` of n·k one-position rows, in the order (prefix, candidate)."""
        k = next(iter(self.delta.values())).shape[1]
        return Terms(
            {n: x.repeat_interleave(k, 0).unsqueeze(1) for n, x in self.x.items()},
            {n: d.reshape(-1, 1, d.shape[-1]) for n, d in self.delta.items()},
        )


def next_token_terms(
    loaded: LoadedModel,
    modules: dict[str, torch.nn.Linear],
    prefixes: torch.Tensor,
    candidates: torch.Tensor,
    cache=None,
) -> NextTerms:
    """The own terms δ_s x_sᵀ of each candidate next token's loss: for prefixes (n, s) and candidates (n, k),
    the weight gradient of −log p(candidates[i, j] | prefixes[i]) with the earlier positions' activations held
    fixed (their keys and values come from a KV cache without gradient). This is the loss's exact gradient but
    for the terms that reach the prefix's earlier positions through attention: the last position's δ and x
    are the exact ones (later positions do not exist). One forward of the prefixes but their last tokens (or
    ``cache``, holding exactly that; it is consumed), then one batched forward and backward of n·k single
    tokens, with the parameters' own gradients switched off."""
    model = loaded.model
    n, k = candidates.shape
    if cache is None and prefixes.shape[1] > 1:
        with torch.no_grad():
            cache = model(input_ids=prefixes[:, :-1], use_cache=True).past_key_values
    if cache is not None:
        cache.batch_repeat_interleave(k)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(prefixes[:, -1:].repeat_interleave(k, 0))
    xs, ds, handles = _capture(modules)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():  # callers may decode under no_grad
            embeds = embeds.detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, past_key_values=cache, use_cache=cache is not None).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), candidates.reshape(-1), reduction="sum")
            _backward(loss)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return NextTerms(
        {name: xs[name][::k, -1].float() for name in modules},
        {name: ds[name][:, -1].float().reshape(n, k, -1) for name in modules},
    )


def rows_but_last(cache, rows: torch.Tensor):
    """A copy of a KV cache's ``rows`` without its last position: for a decoder's cache of its prefixes, the
    ``cache`` :func:`next_token_terms` takes."""
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    out.crop(-1)  # a negative count: tokens removed from the end
    return out


def sample_moments(
    loaded: LoadedModel, modules: dict[str, torch.nn.Linear], samples: int, length: int, seed: int = 0, chunk: int = 4
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per module Σ x xᵀ and Σ δ δᵀ over ``samples`` texts of ``length`` tokens the model samples itself (no
    BOS, like the batch's texts), every position a loss term: what :class:`KfacMetric` is built from."""
    with torch.no_grad():
        ids = model_samples(loaded, samples, length, seed)[:, 1:]
    xx: dict[str, torch.Tensor] = {}
    dd: dict[str, torch.Tensor] = {}
    for i in range(0, ids.shape[0], chunk):
        part = ids[i : i + chunk]
        a, d = second_moments(loss_terms(loaded, modules, part, torch.ones_like(part, dtype=torch.bool)))
        xx = a if not xx else {n: xx[n] + a[n] for n in a}
        dd = d if not dd else {n: dd[n] + d[n] for n in d}
    return xx, dd


class NextTokenRescorer:
    """The K-FAC next-token evidence for a decoder: the cosine, over every block linear layer the observation
    holds, between the observed gradient and each candidate next token's own terms (:func:`next_token_terms`),
    in the metric of the model's own samples' second moments (ridge × the top eigenvalue)."""

    def __init__(
        self, loaded: LoadedModel, gradients: dict[str, torch.Tensor], ridge: float, samples: int = 16, length: int = 64
    ) -> None:
        self.loaded = loaded
        self.modules = {n: m for n, m in block_linears(loaded).items() if n + ".weight" in gradients}
        xx, dd = sample_moments(loaded, self.modules, samples, length) if self.modules else ({}, {})
        target = {n: gradients[n + ".weight"] for n in self.modules}
        self.scorer = PrefixScorer(target, KfacMetric.from_moments(xx, dd, ridge))

    def cosines(self, prefixes: torch.Tensor, candidates: torch.Tensor, cache=None) -> torch.Tensor:
        """(n, k) for prefixes (n, s) of one length and candidate tokens (n, k); ``cache``: as
        :func:`next_token_terms` takes it."""
        return self.scorer.next_cosines(next_token_terms(self.loaded, self.modules, prefixes, candidates, cache))
