"""SOMP (Li & Li, arXiv 2603.16761): subspace-guided decoding + orthogonal matching pursuit.

Stages (our reconstruction, see the project's research notes; the paper's own equations were unavailable):

1. Token pool (progressive narrowing). While the layer-1 span is not full — for RoPE models that is while the
   batch has fewer distinct tokens than the hidden size, since layer-1 inputs depend on the token alone —
   DAGER's exact layer-1 span check. Beyond that: the rows of the (tied) output-embedding gradient,
   ∂L/∂W[v] = (1/N) Σ_t (p_t(v) − [y_t = v]) h_t, are large exactly for the batch's target tokens (recall in
   ``benchmarks/results/gradient/analysis.md``, "Numbers moved from code comments"). Option ``pool``: ``span`` ranks
   by the rank-capped layer-1 span distance instead, ``headwise`` by the head-wise subspace scores (each head's
   Q/K/V gradient block has at most head_dim rows, so it is never full rank; :func:`headwise_scores`). The
   head-wise scores find far fewer of the batch's tokens (``benchmarks/headwise_probe.py``; numbers in
   analysis.md), so ``output`` stays the default.
2. Candidates. Exact regime: DAGER's greedy layer-2 search. Full-rank regime (:func:`span_beam_decode`):
   every extension of every prefix is scored by rank-capped span checks of its new position (layer-1 MLP
   input, then layer-2 attention input on a shortlist); a robust outlier test branches texts that share a
   prefix and ends texts (the last token of a text is invisible to attention gradients in the next-token
   task; it is chosen afterwards from the output-embedding gradient).
3. De-duplication, then the dictionary: every candidate's gradient on the first two layers' attention
   projections (for ``classify`` one atom per label of the label set — labels are never taken from the
   victim), and OMP (:mod:`leaklab.attacks.gradient.omp`) refitting least squares against the observed
   gradient at each step; B atoms when B is known, else a residual-based stopping rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leaklab.attacks.base import Recovery, register_gradient_attack
from leaklab.attacks.gradient.dager import (
    DagerOptions,
    Found,
    SpanModel,
    SpanOptions,
    assemble,
    best_effort_decoder,
    complete_last_tokens,
    decoder_search,
    encoder_search,
    full_rank_batch_guess,
    last_token_scores,
    output_gradient,
    start_attack,
    to_recovery,
)
from leaklab.attacks.gradient.dictionary import (
    observed_vector,
    sentence_gradients,
    signal_params,
    sketch_index,
)
from leaklab.attacks.gradient.extend import RopeExtender
from leaklab.attacks.gradient.omp import OmpResult, gram_matrix, ols, omp, refine_swaps
from leaklab.attacks.gradient.prefix import NextTokenRescorer, model_samples, rows_but_last
from leaklab.attacks.gradient.subspace import (
    Subspace,
    attention_subspace,
    candidate_inputs,
    headwise_scores,
    mlp_subspace,
    pair_module_inputs,
    whitener,
)
from leaklab.core import option
from leaklab.errors import UnknownNameError
from leaklab.models.device import chunk_rows
from leaklab.threat.observation import Observation


@dataclass(frozen=True)
class SompOptions(SpanOptions):
    """SOMP's options (``-o key=value``)."""

    max_len: int = option(160, "longest text decoded, in tokens")
    shortlist: int = option(8, "full-rank regime: extensions per prefix re-scored with the layer-2 check")
    rank_cut: int = option(12, "full-rank regime: singular directions dropped from a full-rank span")
    beam: int = option(6, "full-rank regime: prefixes kept per start token")
    end_z: float = option(6.5, "a prefix ends where its best extension is less of an outlier than this (robust z)")
    stop_z: float = option(4.0, "... and stops growing below this (in between: emitted and grown)")
    starts_factor: float = option(1.5, "full-rank regime: first tokens decoded per expected text")
    lm_weight: float = option(0.1, "pool regime: weight of the model's own next-token log-prior in the ranking")
    out_weight: float = option(1.0, "pool regime: weight of the output-gradient matched filter")
    explain: bool = option(True, "pool regime: explain away the decoded positions' output-gradient terms")
    full_weight: float = option(0.0, "pool regime: weight of the layer-2 check's robust z over each shortlist")
    whiten: float = option(
        1e-3, "pool regime: ridge (x top eigenvalue) of the metric whitening the lm_head inputs; 0 = plain cosine"
    )
    branch_second: int = option(
        1, "pool regime: second tokens kept per start token whatever their z (the first position is a sink)"
    )
    last_alternatives: int = option(6, "candidate last tokens per text, left for OMP to choose between")
    omp_tol: float = option(1e-3, "OMP stops when the relative residual falls below this")
    omp_min_gain: float = option(0.01, "OMP stops when an atom lowers the residual by less than this")
    max_atoms: int = option(1024, "largest OMP dictionary")
    best_effort_atoms: bool = option(True, "full-rank regime: DAGER's best-effort texts are dictionary atoms too")
    pool: str = option("output", "full-rank regime: how the token pool is ranked: output, span or headwise")
    refine_rounds: int = option(
        0, "full-rank regime: rounds of residual-verified edits of OMP's chosen texts (cut back, continue); 0 = off"
    )
    refine_width: int = option(4, "residual-verified edits: next tokens tried per source (span check, prior)")
    refine_lookahead: int = option(
        4, "residual-verified edits: tokens per continuation (the first tried, the rest greedy by the span check)"
    )
    refine_back: int = option(2, "residual-verified edits: tokens a text may be cut back before it is continued")
    refine_budget_s: float = option(300.0, "residual-verified edits: time limit, seconds")
    prefix_rescore: float = option(
        0.0,
        "pool regime: weight of the K-FAC next-token evidence over every block linear layer (each shortlist "
        "token's own gradient terms, standardised over the shortlist) when re-ranking the shortlist at "
        "uncertain positions; 0 = off",
    )
    prefix_margin: float = option(
        1.0, "K-FAC re-ranking: positions where the best two shortlist scores differ by less than this"
    )
    prefix_first: int = option(10, "K-FAC re-ranking: and every prefix up to this many tokens")
    prefix_min: int = option(
        3, "K-FAC re-ranking: only prefixes of at least this many tokens (the first position is an attention sink)"
    )
    prefix_ridge: float = option(1e-2, "K-FAC re-ranking: the metric's ridge (x top eigenvalue)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in POOLS:
            raise UnknownNameError("somp pool", self.pool, list(POOLS))
        self.require(
            positive=("beam", "max_atoms", "shortlist", "starts_factor", "refine_lookahead", "prefix_ridge"),
            non_negative=(
                "rank_cut",
                "last_alternatives",
                "branch_second",
                "whiten",
                "omp_tol",
                "refine_rounds",
                "refine_width",
                "refine_back",
                "refine_budget_s",
                "prefix_rescore",
                "prefix_margin",
                "prefix_first",
                "prefix_min",
            ),
        )


#: rankings of the full-rank token pool: the output-embedding gradient's row norms (default; the stacked span
#: below when the update has no such gradient), the layer-1 stacked span distance, or the head-wise scores
POOLS = ("output", "span", "headwise")


def output_pool(spans: SpanModel, size: int | None = None) -> torch.Tensor | None:
    """The tokens with the largest rows of the output-embedding gradient (None without one): ``size`` of them,
    or (``size`` None) max(2d, 1.25 × the knee of the sorted row norms, :func:`norm_knee`)."""
    grad = output_gradient(spans)
    if grad is None:
        return None
    norms = grad.norm(dim=1)
    if size is None:
        d = spans.adapter.hidden_size
        size = max(2 * d, int(1.25 * norm_knee(norms, d // 2, 8 * d)))
    return torch.topk(norms, min(size, norms.numel())).indices


def norm_knee(norms: torch.Tensor, lo: int, hi: int, window: int = 64) -> int:
    """The rank in [lo, hi] where the sorted log row norms fall fastest (mean drop over ``window`` ranks):
    rows of tokens in the batch carry −h_t terms, the others only the softmax mass, so the curve falls
    steeply just past the batch's number of distinct tokens."""
    logs = torch.sort(norms.clamp_min(1e-300), descending=True).values.log()
    hi = min(hi, logs.numel() - window)
    if hi <= lo:
        return lo
    drop = logs[lo:hi] - logs[lo + window : hi + window]
    return lo + int(drop.argmax()) + window // 2


class FullRankChecks:
    """Two prefix-dependent span checks at an extension's new position, for when T > d: the layer-1 MLP input
    (post-attention hidden state; reached without running the MLP, so it scores every extension cheaply) and
    the layer-2 attention input (re-scores a shortlist). Full-rank spans are rank-capped, which no longer
    decides membership but still ranks the batch's extensions first; the score is Σ log distance."""

    def __init__(self, spans: SpanModel, tokens: torch.Tensor, cut: int) -> None:
        ad = spans.adapter
        self.adapter = ad
        self.tokens = tokens
        self.att = self._capped(attention_subspace(spans.obs, ad, 1), cut)
        self.att_module = ad.projections[1].module
        mlp_params = [p.param for p in ad.mlp_inputs(0).projections]
        if all(name in spans.obs.gradients for name in mlp_params):
            self.mlp: Subspace | None = self._capped(mlp_subspace(spans.obs, ad, 0), cut)
            self.mlp_module = ad.mlp_inputs(0).module
            self.fast = RopeExtender.build(ad, tokens)
        else:  # e.g. LoRA on the attention only: the layer-2 attention check scores every extension
            self.mlp, self.mlp_module, self.fast = None, None, None

    @staticmethod
    def _capped(sub: Subspace, cut: int) -> Subspace:
        return sub.capped(sub.dim - cut) if sub.full else sub

    def cheap(self, prefixes: torch.Tensor, chunk: int) -> torch.Tensor:
        """(n, m) log distance of the MLP input of every prefix + every token."""
        n, m = prefixes.shape[0], self.tokens.numel()
        if self.mlp is None:
            rows = torch.arange(n, device=prefixes.device).repeat_interleave(m)
            return self.full(prefixes, rows, self.tokens.repeat(n), chunk).view(n, m)
        if self.fast is not None:
            x = self.fast.all_pairs(prefixes, chunk).view(n * m, -1)
        else:
            rows = torch.arange(n, device=prefixes.device).repeat_interleave(m)
            (x,) = pair_module_inputs(self.adapter, prefixes, rows, self.tokens.repeat(n), [self.mlp_module], 1, chunk)
        return self.mlp.distance(x).clamp_min(1e-12).log().view(n, m)

    def full(self, prefixes: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
        if self.mlp is None:
            (xa,) = pair_module_inputs(self.adapter, prefixes, rows, tokens, [self.att_module], 1, chunk)
            return self.att.distance(xa).clamp_min(1e-12).log()
        xm, xa = pair_module_inputs(self.adapter, prefixes, rows, tokens, [self.mlp_module, self.att_module], 1, chunk)
        return self.mlp.distance(xm).clamp_min(1e-12).log() + self.att.distance(xa).clamp_min(1e-12).log()


class NextTokenEvidence:
    """Per-prefix next-token evidence from one KV-cached forward of the attacked model per decoding step.

    * log p_model(v | prefix), renormalised over the token set (the model's own prior);
    * the output-embedding gradient's matched filter. Row v of ∂L/∂W_out is (1/N) Σ_t (p_t(v) − [y_t = v]) h_t
      (h_t: the lm_head input at position t), so a prefix whose next token is v leaves −h_t in row v. The
      softmax part (1/N) Σ_t p_t(v) h_t ≈ E_t[p_t(v) h_t] (N ≈ T) is subtracted first, estimated from text the
      model samples itself (no data beyond the model) pooled with every position decoded so far (the batch's
      own prefixes, as far as they are right); the filter is f(v) = −cos(g_v − E[p(v) h], h), returned as a
      robust z (higher = better). Teacher-forced (``benchmarks/output_probe.py``) this ranks the true next
      token first more often than the earlier −cos(g_v, h − h̄).

    With ``whiten`` the cosine is taken in the metric M^(−1/2) of the lm_head inputs' second moments (from the
    model's samples, :func:`whitener`): the rows are sums of lm_head inputs, and the directions all of them share
    otherwise decide the cosine; teacher-forced, this raises the first-choice rate (analysis.md). The first
    position of a text (no BOS) is an attention sink: its lm_head input is nearly the same whatever the token, so
    every text's second token matches it about equally (``benchmarks/first_position_probe.py``). There the
    filter only says
    which tokens are second tokens at all: its z is capped at the n-th best value (n: rows), and the span checks
    and the prior choose among them.

    The cache holds each row's prefix but its last token; ``step`` feeds the last tokens, ``select`` keeps the
    cache rows of the prefixes that survive (children share their parent's cache)."""

    def __init__(
        self,
        spans: SpanModel,
        tokens: torch.Tensor,
        samples: int = 32,
        sample_len: int = 96,
        seed: int = 0,
        explain: bool = True,
        whiten: float = 0.0,
    ) -> None:
        from transformers import DynamicCache

        self.model = spans.loaded.model
        self.tokens = tokens
        self.cache = DynamicCache()
        self.head = self.model.get_output_embeddings()
        grad = output_gradient(spans)
        self.rows: torch.Tensor | None = None if grad is None else grad[tokens]
        self.bg_sum: torch.Tensor | None = None
        self.bg_count = 0
        self.explain = explain and self.rows is not None
        self.decoded: torch.Tensor | None = None  # Σ (p_t − e_{y_t}) h_t over the decoded positions (pool rows)
        self.n_decoded = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.white: torch.Tensor | None = None
        if self.rows is not None and samples > 0:
            ids = model_samples(spans.loaded, samples, sample_len, seed)
            second = None
            for i in range(0, samples, 8):  # bounded memory: logits are (8 · sample_len, V)
                h, logits = lm_head_states(self.model, ids[i : i + 8])
                self._add_background(h, logits)
                if whiten > 0:
                    part = h.double().T @ h.double()
                    second = part if second is None else second + part
            if whiten > 0:
                self.white = whitener(second / (samples * (ids.shape[1] - 1)), whiten)

    def _add_background(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Pool Σ p_t(v) h_t over the token set for the positions (h (n, d), logits (n, V)) into the background;
        returns the positions' probabilities over the token set."""
        probs = token_probs(logits, self.tokens)
        part = probs.T @ h.double()
        self.bg_sum = part if self.bg_sum is None else self.bg_sum + part
        self.bg_count += h.shape[0]
        return probs

    def expected(self) -> torch.Tensor:
        """(m, d) what the rows hold apart from the undecoded positions' −h terms: the background alone, or
        (``explain``, once positions are decoded) explaining away — the decoded positions' exact terms
        α Σ (p_t − e_{y_t}) h_t plus the background for the N − n positions left, (1 − α n) E[p(v) h], with
        α = 1/N fitted by least squares of the rows on the decoded terms (N, the batch's token count, is not
        observed). Teacher-forced on long B = 16 this lifts the first-choice rate most late in the texts."""
        bg = self.background()
        if not self.explain or self.decoded is None or self.n_decoded == 0:
            return bg
        alpha = float((self.rows * self.decoded).sum() / (self.decoded * self.decoded).sum().clamp_min(1e-300))
        if not alpha > 0:
            return bg
        return alpha * self.decoded + max(0.0, 1.0 - alpha * self.n_decoded) * bg

    def background(self) -> torch.Tensor:
        """(m, d) the current estimate of E_t[p_t(v) h_t] for the token set."""
        return self.bg_sum / max(self.bg_count, 1)

    @torch.no_grad()
    def step(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log prior (n, m), matched-filter robust z (n, m) or None) for extending each row of ``seqs``."""
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _m, a: captured.append(a[0][:, -1].detach()))
        try:
            out = self.model(seqs[:, -1:], past_key_values=self.cache, use_cache=True)
        finally:
            hook.remove()
        self.cache = out.past_key_values
        logits = out.logits[:, -1].double()
        logp = torch.log_softmax(logits[:, self.tokens], dim=1)
        if self.rows is None:
            return logp, None
        h = captured[0].double()
        probs = self._add_background(h, logits)
        self._last = (h, probs)
        z = self.filter_z(h)
        if seqs.shape[1] == 1:  # first positions (no BOS): lm_head inputs nearly alike, see the class notes
            cap = torch.topk(z, min(z.shape[1], max(1, z.shape[0])), dim=1).values[:, -1:]
            z = torch.minimum(z, cap)
        return logp, z

    def filter_z(self, h: torch.Tensor) -> torch.Tensor:
        """(n, m) the matched filter's robust z (higher = better) for lm_head inputs ``h`` (n, d), uncapped."""
        resid = self.rows - self.expected()
        if self.white is not None:  # rows are sums of lm_head inputs: compare both in the whitened metric
            resid, h = resid @ self.white, h @ self.white
        resid = resid / resid.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = (h @ resid.T) / h.norm(dim=1, keepdim=True).clamp_min(1e-30)  # cos(g_v − E[p(v) h], h)
        return robust_z(cos)  # low cosine = strong −h_t evidence = high z

    def select(self, parents: torch.Tensor, columns: torch.Tensor | None = None) -> None:
        """Keep (and repeat) the cache rows of ``parents``, in the order of the next step's prefixes; with
        ``columns`` (each child's new token, as an index into the token set) the step's positions count as
        decoded: each kept parent's softmax term once, each child's −h term in its token's row."""
        self.cache.reorder_cache(parents)
        if columns is None or not self.explain or self._last is None:
            return
        h, probs = self._last
        kept = torch.unique(parents)
        part = probs[kept].T @ h[kept]
        part.index_add_(0, columns, -h[parents])
        self.decoded = part if self.decoded is None else self.decoded + part
        self.n_decoded += kept.numel()


@torch.no_grad()
def token_probs(logits: torch.Tensor, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """(n, m) softmax over the whole vocabulary (float64) of each logit row, kept at ``tokens``: rows are
    normalised a chunk at a time (``rows``, default from the device's free memory) so the float64 (n, V)
    matrix never exists at once."""
    if rows is None:
        rows = chunk_rows(logits.shape[1] * 8, logits.device, most=4096)
    parts = [torch.softmax(logits[s : s + rows].double(), dim=-1)[:, tokens] for s in range(0, logits.shape[0], rows)]
    return torch.cat(parts) if parts else logits.new_zeros(0, tokens.numel(), dtype=torch.float64)


@torch.no_grad()
def lm_head_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n·(L−1), d) lm_head inputs and (n·(L−1), V) logits at every position of ``ids`` (n, L) but the last."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach()))
    try:
        logits = model(ids).logits[:, :-1]
    finally:
        hook.remove()
    h = captured[0][:, :-1]
    return h.reshape(-1, h.shape[-1]), logits.reshape(-1, logits.shape[-1])


def _loops(seqs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n, m) True where appending tokens[j] to seqs[i] starts a loop: it repeats a trigram already in seqs[i],
    or extends a run of one token ("A A" gives the input of "A": under RoPE attention over identical tokens
    reproduces the same layer inputs, so the span checks cannot stop a loop)."""
    out = torch.zeros(seqs.shape[0], tokens.numel(), dtype=torch.bool, device="cpu")
    col = {int(t): j for j, t in enumerate(tokens.tolist())}
    for i, row in enumerate(seqs.tolist()):
        if len(set(row)) == 1 and row[0] in col:
            out[i, col[row[0]]] = True
    if seqs.shape[1] < 3:
        return out
    for i, row in enumerate(seqs.tolist()):
        last = (row[-2], row[-1])
        for a, b, c in zip(row, row[1:], row[2:], strict=False):
            if (a, b) == last and c in col:
                out[i, col[c]] = True
    return out.to(seqs.device)


def robust_z(scores: torch.Tensor) -> torch.Tensor:
    """(n, m) → (n, m): how far below each row's median a score lies, in units of the row's MAD."""
    med = scores.median(dim=1, keepdim=True).values
    mad = (scores - med).abs().median(dim=1, keepdim=True).values.clamp_min(1e-9)
    return (med - scores) / mad


SENTENCE_ENDS = (".", "!", "?", '."', '!"', '?"', ".'", ".)")


def sentence_final(loaded, tokens: torch.Tensor) -> torch.Tensor:
    """(m,) True for the tokens whose text ends a sentence."""
    ends = [loaded.tokenizer.decode([t]).rstrip().endswith(SENTENCE_ENDS) for t in tokens.tolist()]
    return torch.tensor(ends, device=tokens.device)


class PrefixRerank:
    """The K-FAC next-token evidence in the pool decoder (option ``prefix_rescore``): where the decoder is unsure
    — every prefix of ``prefix_min`` to ``prefix_first`` tokens, and wherever the best two shortlist scores
    differ by less than ``prefix_margin`` — the shortlist is re-ranked by its score plus ``prefix_rescore`` × the
    standardised cosine between the observed gradient and each token's own gradient terms over every block linear layer
    (:class:`leaklab.attacks.gradient.prefix.NextTokenRescorer`). Only the order changes: the beams' running
    scores stay the decoder's own. ``stats``: prefixes re-ranked, first choices changed, seconds re-ranking and
    seconds building the metric."""

    #: candidate tokens per batched backward
    CANDIDATES = 128

    def __init__(self, spans: SpanModel, opts: SompOptions) -> None:
        import time

        start = time.perf_counter()
        self.rescorer = NextTokenRescorer(spans.loaded, spans.obs.gradients, opts.prefix_ridge)
        self.opts = opts
        self.stats = {"modules": len(self.rescorer.modules), "rows": 0, "changed": 0, "seconds": 0.0}
        self.stats["setup_seconds"] = time.perf_counter() - start

    def cosines(
        self, seqs: torch.Tensor, tokens: torch.Tensor, short: torch.Tensor, cache, rows: torch.Tensor
    ) -> torch.Tensor:
        """(len(rows), k) the K-FAC cosines of the shortlist tokens ``tokens[short[rows]]`` after ``seqs[rows]``."""
        parts = []
        for part in rows.split(max(1, self.CANDIDATES // short.shape[1])):  # bounded memory per backward
            past = rows_but_last(cache, part) if seqs.shape[1] > 1 else None
            parts.append(self.rescorer.cosines(seqs[part], tokens[short[part]], past))
        return torch.cat(parts)

    def __call__(self, seqs: torch.Tensor, tokens: torch.Tensor, short: torch.Tensor, both: torch.Tensor, cache):
        """The shortlist's order, best first (``both``: lower is better; ``cache``: the decoder's KV cache of
        ``seqs``)."""
        import time

        rank = torch.argsort(both, dim=1)
        if not self.rescorer.modules or short.shape[1] < 2 or seqs.shape[1] < self.opts.prefix_min:
            return rank
        start = time.perf_counter()
        ordered = both.gather(1, rank)
        unsure = (ordered[:, 1] - ordered[:, 0]) < self.opts.prefix_margin
        if seqs.shape[1] <= self.opts.prefix_first:
            unsure[:] = True
        rows = torch.nonzero(unsure).flatten()
        if rows.numel() == 0:
            return rank
        z = standardised(self.cosines(seqs, tokens, short, cache, rows))
        adjusted = both.clone()
        adjusted[rows] = adjusted[rows] - self.opts.prefix_rescore * z.to(both)
        new = torch.argsort(adjusted, dim=1)
        self.stats["rows"] += int(rows.numel())
        self.stats["changed"] += int((new[rows, 0] != rank[rows, 0]).sum())
        self.stats["seconds"] += time.perf_counter() - start
        return new


def standardised(v: torch.Tensor) -> torch.Tensor:
    """(n, k) → (n, k): each row minus its mean, over its standard deviation."""
    return (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True).clamp_min(1e-12)


def span_beam_decode(
    spans: SpanModel,
    tokens: torch.Tensor,
    n_texts: int,
    opts: SompOptions,
    prior: bool = False,
    stats: dict | None = None,
) -> list[Found]:
    """Full-rank regime decoding (stage 2): from the start tokens that best pass the checks at position 0,
    grow every prefix by the extensions among ``tokens`` that stand out (cheap check over all, both checks
    over a shortlist): the best one, and every other that is as much of an outlier (texts sharing a prefix),
    at most ``beam`` prefixes per start token. A prefix ends where its best extension stops standing out
    (the next-token task's last token reaches no attention gradient; it is added afterwards); in the
    ambiguous band between ``stop_z`` and ``end_z`` it is both emitted and continued, for OMP to decide.

    With ``prior`` (the token set is the output-gradient pool: T well above d, the checks rank the true token
    first only a fraction of the time) the ranking is robust z + ``lm_weight`` · log p_model(token | prefix)
    + ``out_weight`` · the output-gradient filter's robust z (:class:`NextTokenEvidence`) over the pool,
    prefixes are not ended by the outlier test (it no longer separates), and a candidate is emitted wherever
    the best next token ends a sentence: OMP chooses the length. There, ``branch_second`` > 1 keeps that many
    second tokens per start token (up to ``beam``), each grown on, for OMP to choose between; with
    ``prefix_rescore`` > 0 the shortlist is re-ranked where the decoder is unsure (:class:`PrefixRerank`, its
    counts in ``stats['prefix_rescore']``)."""
    import time

    checks = FullRankChecks(spans, tokens, opts.rank_cut)
    use_prior = prior and (opts.lm_weight > 0 or opts.out_weight > 0)
    ends = sentence_final(spans.loaded, tokens) if use_prior else None
    evidence = NextTokenEvidence(spans, tokens, explain=opts.explain, whiten=opts.whiten) if use_prior else None
    rerank = PrefixRerank(spans, opts) if use_prior and opts.prefix_rescore > 0 else None
    if rerank is not None and stats is not None:
        stats["prefix_rescore"] = rerank.stats
    dev = spans.device
    empty = torch.zeros(1, 0, dtype=torch.long, device=dev)
    zeros = torch.zeros(tokens.numel(), dtype=torch.long, device=dev)
    first = checks.full(empty, zeros, tokens, opts.chunk)
    n_starts = min(tokens.numel(), max(1, round(opts.starts_factor * n_texts)))
    order = torch.argsort(first)[:n_starts]
    seqs = tokens[order].view(-1, 1)
    group = torch.arange(n_starts, device=dev)
    total = first[order].clone()  # Σ score so far
    done: list[Found] = []
    limit = min(opts.max_len, spans.max_position())
    t_end = time.perf_counter() + opts.budget_s
    k = min(opts.shortlist, tokens.numel())
    for p in range(1, limit + 1):
        if seqs.shape[0] == 0:
            break
        n = seqs.shape[0]
        cheap = checks.cheap(seqs, opts.chunk)
        cheap = cheap.masked_fill(_loops(seqs, tokens), 0.0)  # log distance 0 = distance 1: never chosen
        z = robust_z(cheap)
        if use_prior:  # span evidence (robust z), the model's own prior and the output-gradient filter
            logp, out_z = evidence.step(seqs)
            mixed = z + opts.lm_weight * logp
            if out_z is not None and opts.out_weight > 0:
                mixed = mixed + opts.out_weight * out_z
            short = torch.topk(mixed, k, dim=1).indices
            rows = torch.arange(n, device=dev).repeat_interleave(k)
            both = -mixed.gather(1, short)  # lower is better, like a log distance
            if opts.full_weight > 0 and k > 2:  # the shortlist re-scored by both span checks, as a robust z
                full = checks.full(seqs, rows, tokens[short].flatten(), opts.chunk).view(n, k)
                both = both - opts.full_weight * robust_z(full)
        else:
            short = torch.topk(cheap, k, dim=1, largest=False).indices  # (n, k)
            rows = torch.arange(n, device=dev).repeat_interleave(k)
            both = checks.full(seqs, rows, tokens[short].flatten(), opts.chunk).view(n, k)
        rank = torch.argsort(both, dim=1) if rerank is None else rerank(seqs, tokens, short, both, evidence.cache)
        z_short = z.gather(1, short.gather(1, rank))  # robust z of the shortlist, best (by both checks) first
        last_step = time.perf_counter() > t_end or p == limit
        if use_prior:
            emit = ends[short.gather(1, rank)[:, 0]] | last_step
            stop = torch.full_like(emit, last_step)
        else:
            emit = (z_short[:, 0] < opts.end_z) | last_step
            stop = (z_short[:, 0] < opts.stop_z) | last_step
        for i in torch.nonzero(emit).flatten().tolist():
            done.append(Found(seqs[i].tolist(), float(total[i]) / p, exact=False))
            if bool(stop[i]):  # the second-to-last position (one loss term) is the weakest: also keep it
                tail = tokens[short[i, rank[i, 0]]].view(1)
                score = float(total[i] + both[i, rank[i, 0]]) / (p + 1)
                done.append(Found([*seqs[i].tolist(), int(tail)], score, exact=False))
        children: dict[int, list[tuple[float, torch.Tensor, torch.Tensor, int, int]]] = {}
        for i in torch.nonzero(~stop).flatten().tolist():
            for j in range(k):
                wide = use_prior and p == 1 and j < opts.branch_second
                if j > 0 and z_short[i, j] < opts.end_z and not wide:
                    break
                colj = short[i, rank[i, j]]
                tok = tokens[colj]
                score = total[i] + both[i, rank[i, j]]
                kid = (float(score), torch.cat([seqs[i], tok.view(1)]), score, i, int(colj))
                children.setdefault(int(group[i]), []).append(kid)
        nxt, nxt_group, nxt_total, parents, columns = [], [], [], [], []
        for g, kids in children.items():
            for _, seq, score, parent, colj in sorted(kids, key=lambda c: c[0])[: opts.beam]:
                nxt.append(seq)
                nxt_group.append(g)
                nxt_total.append(score)
                parents.append(parent)
                columns.append(colj)
        if not nxt:
            break
        seqs, group, total = torch.stack(nxt), torch.tensor(nxt_group, device=dev), torch.stack(nxt_total)
        if evidence is not None:
            evidence.select(torch.tensor(parents, device=dev), torch.tensor(columns, device=dev))
    return done


class TextEdits:
    """The edits of a chosen text that :func:`leaklab.attacks.gradient.refine.refine_texts` scores by the
    residual: the text cut back by 0 to ``refine_back`` tokens, then continued by each of the base's best next
    tokens followed by ``refine_lookahead`` − 1 tokens of greedy span-check decoding (a continuation of several
    tokens is told from a wrong one by the residual far more often than a single token: analysis.md, session
    17), plus the bare cuts. Best next tokens: the ``refine_width`` best by the layer-1 MLP input check's robust z
    over the token set and the ``refine_width`` most likely under the model's own prior."""

    def __init__(self, spans: SpanModel, tokens: torch.Tensor, opts: SompOptions) -> None:
        self.checks = FullRankChecks(spans, tokens, opts.rank_cut)
        self.model = spans.loaded.model
        self.tokens = tokens
        self.width = min(opts.refine_width, tokens.numel())
        self.lookahead = opts.refine_lookahead
        self.back = opts.refine_back
        self.chunk = opts.chunk
        self.device = spans.device

    def _span_z(self, prefix: list[int]) -> torch.Tensor:
        seq = torch.tensor([prefix], device=self.device)
        return robust_z(self.checks.cheap(seq, self.chunk).masked_fill(_loops(seq, self.tokens), 0.0))[0]

    @torch.no_grad()
    def next_tokens(self, prefix: list[int]) -> list[int]:
        """The base's best next tokens by the span check, then by the prior (duplicates dropped)."""
        z = self._span_z(prefix)
        logp = self.model(torch.tensor([prefix], device=self.device)).logits[0, -1, self.tokens]
        picks = torch.cat([torch.topk(z, self.width).indices, torch.topk(logp, self.width).indices])
        return list(dict.fromkeys(self.tokens[picks].tolist()))

    @torch.no_grad()
    def greedy(self, text: list[int], steps: int) -> list[int]:
        """``text`` grown ``steps`` tokens, each the span check's best next token."""
        for _ in range(steps):
            text = text + [int(self.tokens[self._span_z(text).argmax()])]
        return text

    def __call__(self, text: list[int]) -> list[list[int]]:
        out: list[list[int]] = []
        for cut in range(min(self.back, len(text) - 2) + 1):
            base = text[: len(text) - cut]
            if cut:
                out.append(base)
            out += [self.greedy(base + [v], self.lookahead - 1) for v in self.next_tokens(base)]
        return out


def residual_refine(
    spans: SpanModel, tokens: torch.Tensor, texts: list[list[int]], opts: SompOptions
) -> tuple[list[list[int]], list[float]]:
    """OMP's chosen texts after ``refine_rounds`` rounds of residual-verified edits (:class:`TextEdits`,
    :func:`leaklab.attacks.gradient.refine.refine_texts`) on the OMP dictionary's coordinates; returns the
    texts and the relative residual before and after each round."""
    import time

    from leaklab.attacks.gradient.refine import refine_texts

    loaded = spans.loaded
    index = sketch_index(spans.obs, signal_params(loaded))
    target = observed_vector(spans.obs, index, spans.device)

    def gradients(batch: list[list[int]]) -> torch.Tensor:
        return sentence_gradients(loaded, batch, None, index, head_means=spans.head_means)

    deadline = time.perf_counter() + opts.refine_budget_s
    edits = TextEdits(spans, tokens, opts)
    out, _, history = refine_texts(
        texts, gradients(texts), target, edits, gradients, rounds=opts.refine_rounds, deadline=deadline
    )
    return out, history


def dedupe(found: list[Found]) -> list[Found]:
    return assemble(found, None)


LAST_MARGIN = 0.2  # runner-up last tokens scoring at least this share of the best one become atoms


def with_last_alternatives(spans: SpanModel, found: list[Found], k: int, room: int | None = None) -> list[Found]:
    """Exact-regime texts lack their last token (next-token task): one candidate per ``k`` best-scoring last
    tokens (:func:`last_token_scores`); OMP's swap refinement picks among them. With ``room`` (the dictionary's
    atom budget) runners-up are dropped, worst rank first across all texts, before any text loses its best
    completion: a capped dictionary keeps every decoded text rather than the alternatives of the first ones."""
    if not (spans.causal and spans.next_token) or not found:
        return found
    scores = last_token_scores(spans, [f.ids for f in found], top=k, floor=LAST_MARGIN)
    if scores is None:
        return found
    val, top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    keep = val >= LAST_MARGIN * val[:, :1]  # only close runners-up are worth a dictionary atom
    rank = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    width = keep.shape[1]
    while room is not None and width > 1 and int(keep.sum()) > room:
        width -= 1
        keep &= rank < width
    return [
        Found(f.ids + [t], f.score, f.exact, {"prefix": len(f.ids)})
        for f, alts, ok in zip(found, top.tolist(), keep.tolist(), strict=True)
        for t, good in zip(alts, ok, strict=True)
        if good
    ]


def select_by_omp(
    spans: SpanModel, found: list[Found], n_known: int | None, opts: SompOptions, kept_from: Observation | None = None
) -> tuple[list[Found], dict]:
    """Stage 3: OMP over the candidates' gradients (one atom per label for ``classify``). ``kept_from``: a
    sparsified update whose kept (non-zero) coordinates alone are compared (OMP on the kept coordinates)."""
    found = found[: opts.max_atoms]
    if not found:
        return [], {"omp_stop": "no candidates"}
    loaded = spans.loaded
    labels = list(range(loaded.ref.num_labels)) if loaded.ref.task == "classify" else [None]
    params = signal_params(loaded)
    source = kept_from if kept_from is not None else spans.obs
    index = sketch_index(source, params, kept_only=kept_from is not None)
    sentences = [f.ids for f in found for _ in labels]
    atom_labels = [lab for _ in found for lab in labels] if labels != [None] else None
    atoms = sentence_gradients(loaded, sentences, atom_labels, index, head_means=spans.head_means)
    # one text per group: texts sharing a prefix with different last-token guesses are alternatives
    keys: dict[tuple, int] = {}
    text_group = [
        keys.setdefault(("prefix", *f.ids[: f.meta["prefix"]]) if "prefix" in f.meta else ("text", i), len(keys))
        for i, f in enumerate(found)
    ]
    groups = [text_group[i] for i in range(len(found)) for _ in labels]
    target = observed_vector(source, index, spans.device)
    res = best_selection(atoms, target, n_known, groups, opts)
    chosen = [found[atom // len(labels)] for atom in res.selected]
    info = {
        "omp_coef": [float(c) for c in res.coef],
        "omp_stop": res.stop,
        "omp_residual": res.residual_norms[-1] if res.residual_norms else 1.0,
        "dictionary": len(sentences),
    }
    return chosen, info


#: swaps tried after the OLS start (the OMP start's search tries 60,000)
OLS_SWAP_TRIALS = 6000


def best_selection(
    atoms: torch.Tensor, target: torch.Tensor, n_known: int | None, groups: list[int], opts: SompOptions
) -> OmpResult:
    """OMP then swaps; when that leaves a residual above ``omp_tol`` (no exact fit), orthogonal least squares
    then swaps as well (OMP's greedy step can settle on a pair of texts that each differ from the truth by one
    token, a local minimum one swap cannot leave), keeping the lower residual. The second search starts only
    where OLS picks other texts than OMP did, and tries fewer swaps (:data:`OLS_SWAP_TRIALS`)."""
    gram = gram_matrix(atoms)
    res = refine_swaps(
        atoms, target, omp(atoms, target, n_known, opts.omp_tol, opts.omp_min_gain, groups), groups, gram=gram
    )
    if not res.residual_norms or res.residual_norms[-1] <= opts.omp_tol:
        return res
    start = ols(atoms, target, len(res.selected), groups, gram)
    if {groups[i] for i in start.selected} == {groups[i] for i in res.selected}:
        return res
    alt = refine_swaps(atoms, target, start, groups, max_trials=OLS_SWAP_TRIALS, gram=gram)
    better = alt.residual_norms and alt.residual_norms[-1] < res.residual_norms[-1]
    return alt if better else res


@register_gradient_attack("somp", SompOptions, aliases=("somp-any",))
class SompAttack:
    """SOMP: subspace-guided OMP over candidate-sentence gradients (any setting, through its view)."""

    name = "somp"

    def __init__(self, opts: SompOptions | None = None, kept_from: Observation | None = None) -> None:
        self.opts = opts or SompOptions()
        #: a sparsified update: OMP compares its kept coordinates only (the adaptive attacker against top-k)
        self.kept_from = kept_from

    def token_set(self, spans: SpanModel) -> torch.Tensor:
        """The batch's tokens: exact from layer 1 while its span is not full, else the largest rows of the
        output-embedding gradient (progressive narrowing)."""
        if spans.l1_exact:
            return spans.candidates(0, self.opts.tau1)
        size = 2 * spans.adapter.hidden_size
        if self.opts.pool == "headwise":
            inputs = candidate_inputs(spans.adapter, spans.vocab, 0)
            scores = headwise_scores(spans.obs, spans.adapter, inputs)
            return spans.vocab[torch.topk(scores, min(size, scores.numel())).indices]
        pool = output_pool(spans) if self.opts.pool == "output" else None
        return pool if pool is not None else spans.candidates(0, 0.0, topk=size)

    def rechoose_last_tokens(self, spans: SpanModel, chosen: list[Found], info: dict) -> tuple[list[Found], dict]:
        """Second pass over the last tokens. :func:`last_token_scores` subtracts the softmax terms of every
        prefix it is given as if they were the batch; on the whole candidate list (near-duplicates, truncated
        copies) that over-subtracts and can push the true last token out of the alternatives. Rescored with
        only OMP's chosen prefixes as the batch, their alternatives go through OMP once more (one per text)."""
        pairs = [(f, f.meta["prefix"]) for f in chosen if "prefix" in f.meta]
        if not pairs or len(pairs) != len(chosen):
            return chosen, info
        prefixes = [Found(f.ids[:cut], f.score, f.exact) for f, cut in pairs]
        again = with_last_alternatives(spans, prefixes, self.opts.last_alternatives, self.opts.max_atoms)
        rechosen, again_info = select_by_omp(spans, again, len(chosen), self.opts, self.kept_from)
        if len(rechosen) != len(chosen) or again_info["omp_residual"] > info["omp_residual"]:
            return chosen, info | {"last_token_pass": "kept"}
        return rechosen, again_info | {"dictionary": info["dictionary"], "last_token_pass": "rechosen"}

    def run(self, obs: Observation, tokens: torch.Tensor | None = None, prior: bool | None = None) -> Recovery:
        """``tokens``: a token set found otherwise (the adaptive attacker's selection under known noise): the
        pool decoder runs on it whatever the spans' rank, with the model's prior and the output-gradient
        filter when ``prior`` (default: only where layer 1 is full rank); where the spans are not full rank the
        exact search's texts join the dictionary too, and OMP chooses."""
        spans, n_known, info = start_attack(obs)
        given = tokens is not None
        dopts = DagerOptions(
            tau1=self.opts.tau1,
            tau2=self.opts.tau2,
            max_len=self.opts.max_len,
            chunk=self.opts.chunk,
            budget_s=self.opts.budget_s,
        )
        if spans.causal and not spans.full_rank and tokens is None:
            found = dedupe(decoder_search(spans, dopts))
            found = with_last_alternatives(spans, found, self.opts.last_alternatives, self.opts.max_atoms)
        elif spans.causal:
            n_texts = n_known or full_rank_batch_guess(spans)
            tokens = self.token_set(spans) if tokens is None else tokens
            prior = not spans.l1_exact if prior is None else prior
            info["token_set"] = int(tokens.numel())
            found = dedupe(span_beam_decode(spans, tokens, n_texts, self.opts, prior=prior, stats=info))
            extra: list[Found] = []
            if self.opts.best_effort_atoms:  # DAGER's greedy best-effort texts join the dictionary too
                extra = assemble(best_effort_decoder(spans, n_texts, dopts), None)
                complete_last_tokens(spans, extra)
                info["best_effort_atoms"] = len(extra)
            room = max(0, self.opts.max_atoms - len(extra))
            found = with_last_alternatives(spans, found[:room], self.opts.last_alternatives, room)
            seen = {tuple(f.ids) for f in extra}
            found = [f for f in found if tuple(f.ids) not in seen][:room] + extra
            if given and not spans.full_rank:  # a given token set on exact spans: the exact search's texts too
                exact = dedupe(decoder_search(spans, dopts))
                info["exact_candidates"] = len(exact)
                exact = with_last_alternatives(spans, exact, self.opts.last_alternatives, self.opts.max_atoms)
                found = dedupe(exact + found)[: self.opts.max_atoms]
        else:
            found = dedupe(encoder_search(spans, n_known or 1, dopts))
        info["candidates"] = len(found)
        chosen, omp_info = select_by_omp(spans, found, n_known, self.opts, self.kept_from)
        chosen, omp_info = self.rechoose_last_tokens(spans, chosen, omp_info)
        if self.opts.refine_rounds > 0 and spans.causal and spans.full_rank and spans.next_token and chosen:
            texts, history = residual_refine(spans, tokens, [f.ids for f in chosen], self.opts)
            chosen = [Found(t, f.score, exact=False) for t, f in zip(texts, chosen, strict=True)]
            omp_info["refine_residual"] = history
        info.update(omp_info)
        info["batch_size_estimate"] = n_known or len(chosen)
        return to_recovery(spans, chosen, info)
