"""DAGER (Petrov et al., NeurIPS 2024): exact batch recovery from low-rank attention gradients.

1. Layer-1 filter: a vocabulary token v can occur at position p only if its first-layer input x(v, p) lies in
   the row space R₁ of the layer-1 attention gradients (position-independent for RoPE models).
2. Decoders: grow all prefixes greedily; an extension prefix + [v] survives iff the layer-2 attention input
   at its new last position lies in R₂ (it is fixed by the prefix in a causal model). A prefix with no
   surviving extension is a finished sentence.
3. Encoders: per-position candidates, then whole sentences scored by their mean layer-2 distance (exhaustive
   below a cap, coordinate search above it).

When the batch has as many tokens as the hidden size the gradients are full rank and the span check cannot
separate tokens: the attack then warns and ranks by distance to a rank-capped basis (best effort).
In the next-token task the last token of each text feeds no loss through attention (its own prediction has
no target), so it is recovered from the output-embedding gradient instead (:func:`last_tokens`).
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from leaklab.attacks.base import Recovery, register_gradient_attack
from leaklab.attacks.gradient.dictionary import head_input_gradients, head_inputs, shared_softmax_applies
from leaklab.attacks.gradient.subspace import (
    attention_subspace,
    extension_inputs,
    sequence_inputs,
    token_distances,
)
from leaklab.core import Config, option
from leaklab.models.device import chunk_rows
from leaklab.models.registry import LoadedModel, load_model
from leaklab.threat.observation import Observation

log = logging.getLogger(__name__)

#: DAGER's rank cap in the best-effort regime (rank = d − this)
RANK_CUTOFF = 20


@dataclass(frozen=True)
class SpanOptions(Config):
    """Options every span attack shares (DAGER's and SOMP's span checks and decoding limits)."""

    tau1: float = option(1e-3, "layer-1 span distance below which a token is in the batch")
    tau2: float = option(1e-3, "layer-2 span distance below which an extension is in the batch")
    max_len: int = option(512, "longest sequence searched, in tokens")
    chunk: int = option(2048, "extensions per forward pass")
    budget_s: float = option(900.0, "decoding time limit (s); prefixes still open then are closed as they stand")

    def __post_init__(self) -> None:
        self.require(positive=("max_len", "chunk"), non_negative=("tau1", "tau2", "budget_s"))


@dataclass(frozen=True)
class DagerOptions(SpanOptions):
    """DAGER's options (``-o key=value``); ``budget_s`` limits the best-effort decoding."""

    max_frontier: int = option(4096, "most prefixes kept per step (exact regime)")
    encoder_cap: int = option(4096, "most full combinations enumerated per length (encoders)")
    best_effort_topk: int = option(0, "tokens tried per position in best-effort mode (0: 2 x hidden size)")
    best_effort_max_len: int = option(48, "longest text decoded in best-effort mode")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(
            positive=("max_frontier", "encoder_cap", "best_effort_max_len"), non_negative=("best_effort_topk",)
        )


@dataclass
class Found:
    """One recovered sequence with its mean layer-2 distance (0 for exact)."""

    ids: list[int]
    score: float
    exact: bool = True
    meta: dict = field(default_factory=dict)


class SpanModel:
    """The observed layer-1/layer-2 subspaces and the model they belong to."""

    def __init__(self, obs: Observation, loaded: LoadedModel | None = None) -> None:
        self.obs = obs
        self.loaded = loaded or load_model(obs.model)
        self.adapter = self.loaded.adapter
        self.sub1 = attention_subspace(obs, self.adapter, 0)
        self.sub2 = attention_subspace(obs, self.adapter, 1)
        self.l1_exact, self.l2_exact = not self.sub1.full, not self.sub2.full
        self.full_rank = not (self.l1_exact and self.l2_exact)
        self.device = self.adapter.device
        self.vocab = torch.arange(self.adapter.embeddings.num_embeddings, device=self.device)
        self._dist1: dict[int, torch.Tensor] = {}
        #: per span layer, the distance a true input may have from a span estimated under a protocol's known
        #: noise (:func:`leaklab.attacks.gradient.views.denoise_deltas`): the floor of the span thresholds
        self.noise_tolerance: dict[int, float] = dict(obs.meta.get("span_tolerance", {}))
        #: Wᵀ p (float32) of the LM head's softmax after each prefix seen, shared by the last-token scores and
        #: SOMP's atoms (:func:`leaklab.attacks.gradient.dictionary.head_input_gradients`)
        self.head_means: dict[tuple[int, ...], torch.Tensor] = {}
        #: per prefix, the gradient of its known next-token terms at its input embeddings (tied heads only)
        self.tied_inputs: dict[tuple[int, ...], torch.Tensor] = {}
        # a full-rank span check separates nothing: rank-cap it (DAGER's best effort); a RoPE model's layer-1
        # inputs depend on the token alone, so layer 1 often stays exact while layer 2 is full
        cap = self.adapter.hidden_size - RANK_CUTOFF
        if self.sub1.full:
            self.sub1 = self.sub1.capped(cap)
        if self.sub2.full:
            self.sub2 = self.sub2.capped(cap)

    @property
    def causal(self) -> bool:
        return self.adapter.is_causal

    @property
    def next_token(self) -> bool:
        return self.loaded.ref.task == "next-token"

    def layer1_distances(self, position: int) -> torch.Tensor:
        """dist(x(v, p), R₁) for the whole vocabulary (memoised; one pass for RoPE models)."""
        key = 0 if self.adapter.position != "learned" else position
        if key not in self._dist1:
            self._dist1[key] = token_distances(self.adapter, self.sub1, self.vocab, key)
        return self._dist1[key]

    def tau(self, layer: int, tau: float) -> float:
        """The span threshold of ``layer`` (0: layer 1, 1: layer 2): ``tau``, or the noise tolerance if larger."""
        return max(tau, self.noise_tolerance.get(layer, 0.0))

    def candidates(self, position: int, tau: float, topk: int = 0) -> torch.Tensor:
        """Token ids whose layer-1 distance at ``position`` is below ``tau`` (at least the noise tolerance; or
        the ``topk`` nearest), nearest first."""
        d = self.layer1_distances(position)
        if topk:
            return torch.topk(d, min(topk, d.numel()), largest=False).indices
        ids = torch.nonzero(d < self.tau(0, tau)).flatten()
        return ids[torch.argsort(d[ids])]

    def extension_distances(
        self,
        prefixes: torch.Tensor,
        tokens: torch.Tensor,
        chunk: int = 2048,
        previous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, m) layer-2 distances of prefixes[i] + [tokens[j]] at the new position (causal models), and
        the (n, m, d) inputs. An input equal to the prefix's ``previous`` one (a repeated first token under
        RoPE: "A A A ..." reproduces the input of "A") gets distance 1: it carries no new evidence."""
        x = extension_inputs(self.adapter, prefixes, tokens, layer=1, chunk=chunk)
        dist = self.sub2.distance(x)
        if previous is not None:
            same = (x - previous[:, None, :]).norm(dim=-1) <= 1e-5 * x.norm(dim=-1)
            dist = dist.masked_fill(same, 1.0)
        return dist, x

    def sentence_distances(self, seqs: torch.Tensor) -> torch.Tensor:
        """(n, L) layer-2 distances of every position of whole sequences (no padding)."""
        return self.sub2.distance(sequence_inputs(self.adapter, seqs, 1))

    def max_position(self) -> int:
        pe = self.adapter.position_embeddings
        return pe.num_embeddings if pe is not None else 10**9


def warn_best_effort(spans: SpanModel, info: dict) -> None:
    """Full-rank gradients: say so (log + warning + Recovery.info), never silently."""
    msg = (
        f"the batch's token count reaches the hidden size ({spans.adapter.hidden_size}): the attention gradients "
        f"are full rank (layer-1 rank {spans.sub1.rank}, layer-2 rank {spans.sub2.rank} after capping), so "
        "span checks are inexact; results are best effort, ranked by span distance"
    )
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    info["best_effort"] = True
    info["warning"] = msg


def decoder_search(spans: SpanModel, opts: DagerOptions) -> list[Found]:
    """Greedy exact search: keep every extension whose new position passes the layer-2 span check."""
    frontier = torch.zeros(1, 0, dtype=torch.long, device=spans.device)
    scores = torch.zeros(1, dtype=torch.float64, device=spans.device)
    previous: torch.Tensor | None = None
    finished: list[Found] = []
    limit = min(opts.max_len, spans.max_position())
    for p in range(limit):
        cand = spans.candidates(p, opts.tau1)
        if cand.numel() == 0:
            break
        dist, x = spans.extension_distances(frontier, cand, opts.chunk, previous)
        keep = dist < spans.tau(1, opts.tau2)
        log.debug("step %d: %d prefixes x %d candidates -> %d kept", p, len(frontier), len(cand), int(keep.sum()))
        for i in torch.nonzero(~keep.any(dim=1)).flatten().tolist():
            if p > 0:
                finished.append(Found(frontier[i].tolist(), float(scores[i]) / p))
        rows, cols = torch.nonzero(keep, as_tuple=True)
        if rows.numel() == 0:
            frontier = frontier[:0]
            break
        if rows.numel() > opts.max_frontier:
            order = torch.argsort(dist[rows, cols])[: opts.max_frontier]
            rows, cols = rows[order], cols[order]
        frontier = torch.cat([frontier[rows], cand[cols].view(-1, 1)], dim=1)
        scores = scores[rows] + dist[rows, cols]
        previous = x[rows, cols]
    finished += [
        Found(frontier[i].tolist(), float(scores[i]) / max(frontier.shape[1], 1)) for i in range(frontier.shape[0])
    ]
    return finished


def best_effort_decoder(
    spans: SpanModel, n_sentences: int, opts: DagerOptions, info: dict | None = None
) -> list[Found]:
    """Full-rank regime: start from the nearest first tokens, extend each prefix by its nearest extension,
    stop when the best extension is an outlier against the prefix's own distances (or when ``budget_s``
    runs out: the position reached is recorded as ``info["budget_stop"]``)."""
    t_end = time.perf_counter() + opts.budget_s
    topk = opts.best_effort_topk or 2 * spans.adapter.hidden_size
    starts = spans.candidates(0, 0.0, topk=max(n_sentences, 1))
    frontier = starts.view(-1, 1)
    empty = torch.zeros(1, 0, dtype=torch.long, device=spans.device)
    first = spans.extension_distances(empty, starts, opts.chunk)[0][0]
    hist = [first.tolist()]
    alive = torch.ones(frontier.shape[0], dtype=torch.bool, device=spans.device)
    lengths = torch.full((frontier.shape[0],), opts.best_effort_max_len, device=spans.device)
    limit = min(opts.best_effort_max_len, spans.max_position())
    for p in range(1, limit):
        if not bool(alive.any()):
            break
        if time.perf_counter() > t_end:
            if info is not None:
                info["budget_stop"] = p
            break
        cand = spans.candidates(p, opts.tau1) if spans.l1_exact else spans.candidates(p, 0.0, topk=topk)
        if cand.numel() == 0:  # no token passes the layer-1 check: the texts end here
            break
        dist = spans.extension_distances(frontier, cand, opts.chunk)[0]
        best, arg = dist.min(dim=1)
        past = torch.tensor(hist, dtype=torch.float64, device=spans.device)
        stop = best > past.mean(0) + 3 * past.std(0) + 1e-9 if p >= 4 else torch.zeros_like(alive)
        newly = alive & stop
        lengths[newly] = p
        alive &= ~stop
        frontier = torch.cat([frontier, cand[arg].view(-1, 1)], dim=1)
        hist.append(torch.where(alive, best, past.mean(0)).tolist())
    past = torch.tensor(hist, dtype=torch.float64, device=spans.device)
    out = []
    for i in range(frontier.shape[0]):
        n = int(min(lengths[i], frontier.shape[1]))
        out.append(Found(frontier[i, :n].tolist(), float(past[:n, i].mean()), exact=False))
    return out


def encoder_lengths(spans: SpanModel, cands: list[torch.Tensor], margin: float = 100.0) -> list[int]:
    """Sentence lengths suggested by where the per-position candidate count drops (or the last position).

    Counts are taken twice: over all candidates, and over the confident ones, within ``margin`` × the noise
    floor (the median over positions of the smallest distance). With learned positions a token of one text
    can pass the loose threshold at another text's position (distances in analysis.md), which keeps the count up
    where a shorter text has ended."""
    sizes = [len(c) for c in cands]
    out = {len(sizes)}
    out.update(p + 1 for p in range(len(sizes) - 1) if sizes[p + 1] < sizes[p])
    dists = [spans.layer1_distances(p)[c] for p, c in enumerate(cands) if c.numel()]
    if len(dists) == len(cands) and dists:
        floor = float(torch.stack([d.min() for d in dists]).median())
        sure = [int((d <= margin * floor).sum()) for d in dists]
        out.update(p + 1 for p in range(len(sure) - 1) if sure[p + 1] < sure[p])
    return sorted(out)


def encoder_search(spans: SpanModel, n_sentences: int, opts: DagerOptions) -> list[Found]:
    """Per-position candidates, then full sentences of each plausible length scored by mean layer-2
    distance: exhaustive below ``encoder_cap`` combinations, coordinate descent above."""
    cands: list[torch.Tensor] = []
    topk = opts.best_effort_topk or 4 * max(n_sentences, 1) if spans.full_rank else 0
    for p in range(min(opts.max_len, spans.max_position())):
        c = spans.candidates(p, opts.tau1, topk=topk)
        if c.numel() == 0 or (spans.full_rank and p >= opts.max_len):
            break
        cands.append(c[: max(4 * max(n_sentences, 1), 8)])
    found: dict[tuple[int, ...], Found] = {}
    for length in encoder_lengths(spans, cands):
        pools = cands[:length]
        total = 1
        for c in pools:
            total *= len(c)
        seqs = (
            _enumerate(pools, spans.device)
            if total <= opts.encoder_cap
            else _coordinate_search(spans, pools, n_sentences)
        )
        for seq, score in _score_sentences(spans, seqs, opts.chunk):
            if seq not in found or found[seq].score > score:
                found[seq] = Found(list(seq), score, exact=score < spans.tau(1, opts.tau2))
    return sorted(found.values(), key=lambda f: f.score)


def _enumerate(pools: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(itertools.product(*[c.tolist() for c in pools])), dtype=torch.long, device=device)


def _score_sentences(spans: SpanModel, seqs: torch.Tensor, chunk: int) -> list[tuple[tuple[int, ...], float]]:
    out = []
    step = max(1, chunk // max(seqs.shape[1], 1))
    for s in range(0, seqs.shape[0], step):
        part = seqs[s : s + step]
        d = spans.sentence_distances(part).mean(dim=1)
        out += [(tuple(r), float(v)) for r, v in zip(part.tolist(), d.tolist(), strict=True)]
    return out


def _coordinate_search(spans: SpanModel, pools: list[torch.Tensor], n_starts: int, sweeps: int = 3) -> torch.Tensor:
    """From ``n_starts`` starts (the i-th candidate at every position), repeatedly set each position to its
    best candidate given the others; returns the final sequences."""
    results = []
    for start in range(max(n_starts, 1)):
        seq = torch.stack([c[min(start, len(c) - 1)] for c in pools])
        for _ in range(sweeps):
            changed = False
            for p, c in enumerate(pools):
                trial = seq.repeat(len(c), 1)
                trial[:, p] = c
                best = int(spans.sentence_distances(trial).mean(dim=1).argmin())
                changed |= bool(trial[best, p] != seq[p])
                seq = trial[best]
            if not changed:
                break
        results.append(seq)
    return torch.stack(results)


def last_tokens(spans: SpanModel, prefixes: list[list[int]]) -> list[int | None]:
    """Next-token task: the most likely last token y_b of each text (see :func:`last_token_scores`)."""
    scores = last_token_scores(spans, prefixes, top=1)
    if scores is None:
        return [None] * len(prefixes)
    return scores.argmax(dim=1).tolist()


def output_gradient(spans: SpanModel, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """The observed gradient of the output embedding (V × d, ``dtype``, on the model's device), or None when
    the update lacks it."""
    model = spans.loaded.model
    head = model.get_output_embeddings()
    name = next((n for n, p in model.named_parameters() if head is not None and p is head.weight), None)
    if name is None or name not in spans.obs.gradients:
        return None
    return spans.obs.gradients[name].to(spans.device, dtype)


#: restrict last-token scoring to a token pool (:func:`pooled_scores`); a benchmark turns it off to time the
#: vocabulary-wide reference
LAST_TOKEN_POOL = True
#: starting pool: each position's most likely next tokens, and the best cheap scores of each text
POOL_START = 64


@dataclass
class LastTokenTerms:
    """What every last-token score is built from: lm_head inputs h_t of the N scored positions, their known
    targets y_t (−1 at each prefix's last position, whose target is the unknown), each prefix's last input
    h_b, the Gram terms ⟨h_t, h_b⟩ and the observed output-embedding gradient (float32, as shared)."""

    head: torch.nn.Module
    grad: torch.Tensor  # (V, d)
    flat_h: torch.Tensor  # (N, d) float64
    flat_y: torch.Tensor  # (N,)
    last: torch.Tensor  # (B, d) float64
    gram: torch.Tensor  # (N, B)

    @property
    def has_y(self) -> torch.Tensor:
        return self.flat_y >= 0

    def target_part(self, vocab: int) -> torch.Tensor:
        """(V, B) Σ_{t: y_t = v} ⟨h_t, h_b⟩ over the known targets."""
        out = torch.zeros(vocab, self.gram.shape[1], dtype=torch.float64, device=self.gram.device)
        return out.index_add_(0, self.flat_y[self.has_y], self.gram[self.has_y])

    def logits(self, rows: slice, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of positions ``rows`` (over ``tokens`` only when given)."""
        h = self.flat_h[rows].to(self.head.weight.dtype)
        if tokens is None:
            return self.head(h)
        bias = self.head.bias[tokens] if getattr(self.head, "bias", None) is not None else None
        return torch.nn.functional.linear(h, self.head.weight[tokens], bias)


@torch.no_grad()
def last_token_scores(
    spans: SpanModel, prefixes: list[list[int]], top: int = 1, floor: float = 0.0
) -> torch.Tensor | None:
    """(B, V) evidence that token v ends text b, from the output-embedding gradient (None without one).

    With W the output embedding and h_t its inputs, ∂L/∂W = (1/N) Σ_t (softmax(W h_t) − e_{y_t}) h_tᵀ. Given
    the recovered prefixes every term is known except −e_{y_b} h_bᵀ at each prefix's last position, so
    score_b(v) = −⟨R[v], h_b⟩ with R the observed gradient minus the known terms peaks at v = y_b (a tied
    input embedding's known input-path gradient is subtracted too: :func:`tied_input_gradient`).
    With :data:`LAST_TOKEN_POOL` only a token pool gets exact scores (−inf elsewhere), certified to hold each
    text's ``top`` best tokens among those scoring at least ``floor`` × its best (:func:`pooled_scores`).
    """
    terms = last_token_terms(spans, prefixes)
    if terms is None:
        return None
    if LAST_TOKEN_POOL:
        pooled = pooled_scores(terms, top, floor)
        if pooled is not None:
            return pooled
    return full_scores(terms)


@torch.no_grad()
def last_token_terms(spans: SpanModel, prefixes: list[list[int]]) -> LastTokenTerms | None:
    model = spans.loaded.model
    head = model.get_output_embeddings()
    grad = output_gradient(spans, torch.float32)  # as shared: float64 only for the rows scored exactly
    if grad is None or not prefixes:
        return None
    ids, mask, targets = prefix_batch(spans, prefixes)
    head_name = next(n for n, m in model.named_modules() if m is head)
    captured = [  # the forward stops at the head: no (rows, width, V) logits
        spans.adapter.module_inputs(ids[s : s + 8], [head_name], attention_mask=mask[s : s + 8])[0]
        for s in range(0, len(prefixes), 8)
    ]
    h = torch.cat(captured).double()  # (B, width, d)
    flat_h = h[mask.bool()]  # (n, d)
    last = torch.stack([h[i, len(p) - 1] for i, p in enumerate(prefixes)])  # (B, d)
    tied = tied_input_gradient(spans, ids, mask, targets)
    if tied is not None:
        grad = grad - tied
    return LastTokenTerms(head, grad, flat_h, targets[mask.bool()], last, flat_h @ last.T)


def prefix_batch(spans: SpanModel, prefixes: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prefixes, their mask and next-token targets (−1 at pads and at each prefix's last
    position, whose target is the unknown last token)."""
    width = max(len(p) for p in prefixes)
    pad = spans.loaded.tokenizer.pad_token_id or 0
    ids = torch.full((len(prefixes), width), pad, dtype=torch.long, device=spans.device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prefixes):
        ids[i, : len(p)] = torch.tensor(p, device=spans.device)
        mask[i, : len(p)] = 1
    targets = torch.full_like(ids, -1)
    targets[:, :-1] = ids[:, 1:]
    targets[mask == 0] = -1
    for i, p in enumerate(prefixes):
        targets[i, len(p) - 1] = -1
    return ids, mask, targets


def tied_input_gradient(
    spans: SpanModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor | None:
    """A head tied to the input embedding also collects the gradient that reaches the prefixes' input rows
    (scaled by the model's embedding multiplier, e.g. Gemma's sqrt(d)); it would swamp the last-token scores
    of those rows. Every loss term but −logit_b(y_b) at each prefix's last position is known, so their gradient
    through the input path alone (the head held fixed) is computed and returned (V × d, float32) for the
    caller to subtract; None when the head is not tied. What is left of the unknown terms' input path is one
    position per text (the SOMP dictionary arbitrates it).

    With a plain linear head the head-input gradients Wᵀ p_t − W[y_t] come from the per-prefix cache SOMP's
    atoms share (:func:`leaklab.attacks.gradient.dictionary.head_input_gradients`), so the vocabulary-wide
    softmax runs once per prefix for both; otherwise the loss is formed from the full logits. Each prefix's
    input-embedding gradient is kept (``SpanModel.tied_inputs``): a later call on some of the same prefixes
    (SOMP's second last-token pass) runs only the embedding's backward."""
    model = spans.loaded.model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        return None
    lengths = mask.sum(dim=1).tolist()
    keys = [tuple(ids[i, :n].tolist()) for i, n in enumerate(lengths)]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one row per distinct prefix
    todo = [i for k, i in first.items() if k not in spans.tied_inputs]
    # texts per pass from the free memory: without the shared softmax each holds its (width, V) logits
    shared = shared_softmax_applies(spans.loaded)
    step = 8 if shared else chunk_rows(ids.shape[1] * embed.weight.shape[0] * 16, spans.device, most=8)
    for s in range(0, len(todo), step):
        rows = torch.tensor(todo[s : s + step], device=spans.device)
        grads = _input_gradients(spans, ids[rows], mask[rows], targets[rows], shared)
        for i, dx in zip(rows.tolist(), grads, strict=True):
            spans.tied_inputs[keys[i]] = dx[: lengths[i]]
    seed = torch.zeros(*ids.shape, embed.weight.shape[1], dtype=torch.float32, device=spans.device)
    for i, key in enumerate(keys):
        seed[i, : lengths[i]] = spans.tied_inputs[key]
    weight = embed.weight.detach().float().requires_grad_(True)
    with torch.enable_grad():  # the embedding's own backward: the scatter onto the input rows, with any scale
        x = torch.func.functional_call(embed, {"weight": weight.to(embed.weight.dtype)}, (ids,))
        return torch.autograd.grad(x, weight, grad_outputs=seed.to(x.dtype) / int(mask.sum()))[0]


def _input_gradients(
    spans: SpanModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, shared: bool
) -> torch.Tensor:
    """∂/∂x of the known next-token terms (summed, not averaged) of each row, x its input embeddings."""
    model = spans.loaded.model
    with torch.enable_grad():
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        if shared:
            hidden = head_inputs(spans.loaded, ids, mask, embeds=x)
            lengths = mask.sum(dim=1).tolist()
            seed = head_input_gradients(spans.loaded, hidden.detach(), ids, lengths, spans.head_means, True)
            return torch.autograd.grad(hidden, x, grad_outputs=seed.to(hidden.dtype))[0].float()
        logits = model(inputs_embeds=x, attention_mask=mask).logits.float()
        picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        known = torch.logsumexp(logits, dim=-1)[mask.bool()].sum() - picked[targets >= 0].sum()
        return torch.autograd.grad(known, x)[0].float()


@torch.no_grad()
def full_scores(terms: LastTokenTerms) -> torch.Tensor:
    """The vocabulary-wide reference: (B, V) scores, every softmax over the whole vocabulary in float64."""
    grad, n = terms.grad.double(), terms.flat_h.shape[0]  # N = Σ_b (len_b + 1 − 1) scored positions
    known = torch.zeros(grad.shape[0], terms.last.shape[0], dtype=torch.float64, device=grad.device)
    # rows per chunk from the device's free memory: each holds a (V,) logit row and its float64 softmax
    step = chunk_rows(grad.shape[0] * 16, grad.device, most=4096)
    for s in range(0, n, step):
        probs = torch.softmax(terms.logits(slice(s, s + step)).double(), dim=-1)  # (chunk, V)
        known += probs.T @ terms.gram[s : s + step]
    known -= terms.target_part(grad.shape[0])
    return -(grad @ terms.last.T - known / n).T  # (B, V)


@torch.no_grad()
def pooled_scores(terms: LastTokenTerms, top: int, floor: float = 0.0, start: int = POOL_START) -> torch.Tensor | None:
    """:func:`full_scores` on a token pool, −inf elsewhere; None when no pool up to a quarter of the
    vocabulary is certified (the caller then scores the whole vocabulary).

    score_b(v) = c_b(v) + s_b(v): the cheap part c_b(v) = −⟨G[v], h_b⟩ − (1/N) Σ_{y_t = v} ⟨h_t, h_b⟩ (one
    float32 product with the observed gradient G) and the softmax part s_b(v) = (1/N) Σ_t p_t(v) ⟨h_t, h_b⟩.
    The pool holds the K most likely next tokens of every position and the K best c_b of every text. A token
    outside it has p_t(v) ≤ p_t⁽ᴷ⁺¹⁾ (the (K+1)-th largest probability at t) everywhere, so
    |s_b(v)| ≤ ε_b = (1/N) Σ_t p_t⁽ᴷ⁺¹⁾ |⟨h_t, h_b⟩|: the pool is certified when every outside c_b(v) + ε_b
    (plus float32 slack) stays below each text's ``top``-th best exact pooled score, or below ``floor`` × its
    best when that is higher (a caller keeping only tokens above that share of the best); otherwise K
    doubles."""
    vocab, n = terms.grad.shape[0], terms.flat_h.shape[0]
    k = max(start, top)
    lse, kth, likely = position_softmax_summary(terms, min(vocab - 1, k))
    cheap = -(terms.last.float() @ terms.grad.T).double()  # (B, V)
    cheap -= terms.target_part(vocab).T / n
    # float32 round-off bound of each cheap product: d · u · max_v ‖G[v]‖ · ‖h_b‖, doubled
    slack = 2 * terms.grad.shape[1] * 2**-24 * float(terms.grad.norm(dim=1).max()) * terms.last.norm(dim=1)
    while k <= vocab // 4:
        k_tokens = likely[:, :k] if k <= likely.shape[1] else None
        if k_tokens is None:
            lse, kth, likely = position_softmax_summary(terms, min(vocab - 1, k))
            k_tokens = likely[:, :k]
        best = torch.topk(cheap, min(k, vocab), dim=1).indices
        pool = torch.unique(torch.cat([k_tokens.flatten(), best.flatten(), terms.flat_y[terms.has_y]]))
        exact = pool_scores(terms, pool, lse)  # (B, |pool|)
        outside = cheap.clone()
        outside[:, pool] = -torch.inf
        eps = (terms.gram.abs() * kth_probability(kth, lse, k).unsqueeze(1)).sum(0) / n  # (B,)
        ranked = torch.topk(exact, min(top, pool.numel()), dim=1).values
        need = ranked[:, -1]
        if floor > 0:
            need = torch.where(ranked[:, 0] > 0, torch.maximum(need, floor * ranked[:, 0]), need)
        if bool((need > outside.amax(dim=1) + eps + slack).all()):
            scores = torch.full_like(cheap, -torch.inf)
            scores[:, pool] = exact
            return scores
        k *= 2
    return None


def position_softmax_summary(terms: LastTokenTerms, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position: the log-partition (float64), the K+1 largest logits and the K most likely tokens, from
    float32 logits a chunk of positions at a time (the (N, V) logits are never held)."""
    vocab, n = terms.grad.shape[0], terms.flat_h.shape[0]
    step = chunk_rows(vocab * 4, terms.grad.device, most=4096)
    lses, vals, idxs = [], [], []
    for s in range(0, n, step):
        logits = terms.logits(slice(s, s + step))
        lses.append(torch.logsumexp(logits.double(), dim=-1))
        v, i = torch.topk(logits, min(k + 1, vocab), dim=-1)
        vals.append(v.double())
        idxs.append(i[:, :k])
    return torch.cat(lses), torch.cat(vals), torch.cat(idxs)


def kth_probability(top_logits: torch.Tensor, lse: torch.Tensor, k: int) -> torch.Tensor:
    """p_t⁽ᴷ⁺¹⁾: the (K+1)-th largest probability at each position, an upper bound for tokens outside its
    top K (1 when the vocabulary has no K+1-th token)."""
    if top_logits.shape[1] <= k:
        return torch.ones_like(lse)
    return torch.exp(top_logits[:, k] - lse)


def pool_scores(terms: LastTokenTerms, pool: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Exact (float64) scores of the ``pool`` tokens: :func:`full_scores`' columns at ``pool``."""
    n = terms.flat_h.shape[0]
    probs = torch.exp(terms.logits(slice(0, n), pool).double() - lse.unsqueeze(1))  # (N, |pool|)
    known = probs.T @ terms.gram
    target = torch.zeros_like(known)
    sel = torch.searchsorted(pool, terms.flat_y[terms.has_y])
    target.index_add_(0, sel, terms.gram[terms.has_y])
    return -(terms.grad[pool].double() @ terms.last.T - (known - target) / n).T


def assemble(found: list[Found], n_out: int | None) -> list[Found]:
    """De-duplicate, exact before approximate, then lowest distance; keep ``n_out`` when known."""
    seen: set[tuple[int, ...]] = set()
    uniq = []
    for f in sorted(found, key=lambda f: (not f.exact, f.score)):
        key = tuple(f.ids)
        if key and key not in seen:
            seen.add(key)
            uniq.append(f)
    return uniq[:n_out] if n_out else uniq


def batch_size_of(obs: Observation) -> int | None:
    """B when the threat model grants it, else None (estimated by the attack)."""
    return obs.batch_size if obs.flags.batch_size_known else None


def to_recovery(spans: SpanModel, found: list[Found], info: dict) -> Recovery:
    ids = [f.ids for f in found]
    texts = [spans.loaded.decode(i) for i in ids]
    info.setdefault("n_exact", sum(f.exact for f in found))
    return Recovery(texts, ids, info=info)


def complete_last_tokens(spans: SpanModel, found: list[Found]) -> None:
    """Append each decoder text's invisible last token (next-token task) in place."""
    if not (spans.causal and spans.next_token) or not found:
        return
    for f, tok in zip(found, last_tokens(spans, [f.ids for f in found]), strict=True):
        if tok is not None:
            f.ids = f.ids + [tok]


def start_attack(obs: Observation) -> tuple[SpanModel, int | None, dict]:
    """Subspaces, the batch size if granted, and the info record (with the best-effort warning if needed)."""
    spans = SpanModel(obs)
    n_known = batch_size_of(obs)
    info: dict = {
        "rank_l1": spans.sub1.rank,
        "rank_l2": spans.sub2.rank,
        "best_effort": spans.full_rank,
        "batch_size_known": n_known is not None,
    }
    if spans.full_rank:
        warn_best_effort(spans, info)
    return spans, n_known, info


def full_rank_batch_guess(spans: SpanModel) -> int:
    """Texts to decode at full rank when the batch size is not granted: the rank no longer counts the batch's
    tokens, so the guess is d/16 (a batch of d/16 texts of ~16+ tokens fills the span)."""
    return max(1, spans.adapter.hidden_size // 16)


@register_gradient_attack("dager", DagerOptions, aliases=("dager-any",))
class DagerAttack:
    """DAGER: exact span checks of first-layer inputs, greedy extension checked against layer 2."""

    name = "dager"

    def __init__(self, opts: DagerOptions | None = None) -> None:
        self.opts = opts or DagerOptions()

    def run(self, obs: Observation) -> Recovery:
        spans, b_known, info = start_attack(obs)
        if spans.causal:
            found = (
                best_effort_decoder(spans, b_known or full_rank_batch_guess(spans), self.opts, info)
                if spans.full_rank
                else decoder_search(spans, self.opts)
            )
        else:
            found = encoder_search(spans, b_known or 1, self.opts)
            if not b_known:
                found = [f for f in found if f.exact] or found[:1]
        found = assemble(found, b_known)
        complete_last_tokens(spans, found)
        info["batch_size_estimate"] = b_known or len(found)
        return to_recovery(spans, found, info)
