"""White-box inversion: discrete coordinate search that evaluates the real encoder in batches.

Objective: J(x) = cos(e(x), v) − λ·|x| (λ: a length penalty, since the length is unknown and a longer text
can always fit v a little better with filler); with option ``nonword`` = μ also − μ per word of x built of
several pieces that is no word of the public split (``age ##felt``, ``ob ##vant``: the search assembles such
blends because they fit v a little better than the real word).

0. vocabulary: the public split's words by frequency (option ``vocab``), then (option ``full``) every whole
   word of the tokenizer; option ``pieces`` adds the ``##`` word-piece continuations, so that words the
   tokenizer splits (``hap ##ha ##zard``) can be rebuilt piece by piece.
1. start: the bag-of-words inverter's words for v (or any given text, or the empty text); its top words are
   also proposed at every position (the pool), and so are (option ``prior``) the words w of highest
   cos(e(w), v) over the whole word vocabulary (e(w): each word embedded alone, once per inverter) — content
   words and rare names of v rank there even when the public split never has them.
2. passes over positions t = 0..|x|: with g = ∂cos/∂(input embedding) of x (one backward pass), propose
   the top-K HotFlip swaps x_t → w by the first-order gain ⟨g_t, E_w − E_{x_t}⟩, the deletion of x_t, its
   moves to every other place, and the top-K insertions before t by ⟨ḡ_t, E_w⟩ (ḡ_t: mean gradient of the
   neighbours); (option ``pool_top`` = m) the pool is screened like the vocabulary,
   only its m words of highest first-order gain are tried at t; all proposals are scored by one batched
   forward pass and the best is kept if it raises J.
   (option ``words`` = m) word completion: the public-split words u that the tokenizer cuts into several
   pieces (``heartfelt`` → ``heart ##felt``) and that share the stem or a ``##`` piece with the word at t
   (x_t and its ``##`` continuations) replace that whole word — m of them at most, the most frequent first —
   and the whole word at t is proposed for deletion: the search often assembles a split word from the wrong
   pieces (``age ##felt``, ``ob ##vant``), and no chain of one-token moves reaches the right one without
   passing through worse texts.
3. repeat passes until none raises J (or ``passes`` or the per-vector ``budget`` of encoder passes run out);
   then ``hops`` rounds of basin hopping: kick the best x (delete or replace one or two tokens), descend
   again, keep the result only if its J is higher.
4. (option ``lm``) an LM-guided restart (leaklab.attacks.embedding.lmguide): a causal LM's beam search over
   the LM's next words and the evidence words (the result of 3 and the pool), scored by the encoder, then
   descended again under its own budget ``lm_budget``; kept only if its J is higher.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from leaklab.attacks.embedding.access import Access, Prediction, PublicData
from leaklab.attacks.embedding.bow import BowTraining, train_bow
from leaklab.attacks.embedding.lmguide import LMPrior, lm_beam
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, sub_config
from leaklab.core import Config, option
from leaklab.encoders import Encoder, LocalEncoder, check_vectors, require_local
from leaklab.errors import LeaklabError

COMMON_WORDS = 200  # option common screens this many of the most frequent public-split tokens


def piece_words(tokenizer: Any, texts: list[str]) -> list[tuple[int, ...]]:
    """The distinct words of ``texts`` that the tokenizer cuts into several pieces (a token followed by its
    ``##`` continuations), as token-id tuples, the most frequent first (ties: first appearance); empty for
    tokenizers without the ``##`` convention."""
    special = set(tokenizer.all_special_ids)
    out: Counter[tuple[int, ...]] = Counter()
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        toks = tokenizer.convert_ids_to_tokens(ids)
        word: list[int] = []
        for i, t in [*zip(ids, toks, strict=True), (None, "")]:
            if i is not None and t.startswith("##") and word:
                word.append(i)
                continue
            if len(word) > 1:
                out[tuple(word)] += 1
            word = [i] if i is not None and i not in special and not t.startswith("##") else []
    return [u for u, _ in out.most_common()]


def vocab_from_texts(tokenizer: Any, texts: list[str], size: int = 8000, whole_words: bool = True) -> list[int]:
    """The ``size`` most frequent non-special token ids of ``texts`` (the attacker's public prior); with
    ``whole_words`` no word-piece continuations (``##x``), so every proposal is a word."""
    counts = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
    special = set(tokenizer.all_special_ids)
    ranked = [i for i, _ in counts.most_common() if i not in special]
    if whole_words:
        ranked = [i for i in ranked if not str(tokenizer.convert_ids_to_tokens(i)).startswith("##")]
    return ranked[:size]


class WhiteBoxInverter:
    """Batched coordinate search over token sequences through a local encoder."""

    name = "whitebox"

    def __init__(
        self,
        encoder: Encoder,
        vocab_ids: list[int] | None = None,
        candidates: int = 24,
        length_penalty: float = 0.01,
        max_len: int = 24,
        passes: int = 6,
        prior: int = 0,
        hops: int = 0,
        budget: int = 0,
        seed: int = 0,
        prior_ids: list[int] | None = None,
        lm: LMPrior | None = None,
        lm_budget: int = 3000,
        lm_opts: dict[str, Any] | None = None,
        lm_moves: int = 0,
        lm_restart: bool = True,
        units: list[tuple[int, ...]] | None = None,
        words: int = 0,
        pool_top: int = 0,
        nonword: float = 0.0,
        spans: int = 0,
        common: int = 0,
        common_ids: list[int] | None = None,
        tokenizer: Any = None,
    ) -> None:
        # black-box mode (a tokenizer given): any encoder, texts in and vectors out, no gradient; the search
        # works on the tokenizer's ids and queries the encoder with their decoded texts
        self.black_box = tokenizer is not None
        if self.black_box:
            self.encoder: Encoder = encoder
            tok = tokenizer
            if pool_top > 0:
                raise LeaklabError("option pool_top screens by gradient: it needs white-box access")
        else:
            self.encoder = require_local(encoder, self.name)
            tok = self.encoder.tokenizer
        self.tok = tok
        ranked = vocab_ids is not None  # a given vocabulary is taken as ranked, the most frequent words first
        if vocab_ids is None:
            special = set(tok.all_special_ids)
            vocab_ids = [i for i in range(len(tok)) if i not in special]
        if not vocab_ids:
            raise LeaklabError("white-box vocabulary is empty")
        if max_len < 1 or candidates < 1:
            raise LeaklabError(f"max_len and candidates must be >= 1, got {max_len} and {candidates}")
        self.vocab = torch.tensor(list(dict.fromkeys(vocab_ids)))
        self.candidates, self.penalty, self.max_len, self.passes = candidates, length_penalty, max_len, passes
        self.prior, self.hops, self.budget = prior, hops, budget
        self.rng = np.random.default_rng(seed)
        self.prior_vocab = torch.tensor(list(dict.fromkeys(prior_ids))) if prior_ids else self.vocab
        self.emb = None if self.black_box else self.encoder.word_embeddings.detach()
        self.sub = None if self.emb is None else self.emb[self.vocab]
        # black-box mode: per-position proposals, seq -> |seq|+1 lists of token ids (e.g. a conditioned decoder's
        # top next tokens after seq[:t]); set per vector by ``search``
        self._propose: Callable[[list[int]], list[list[int]]] | None = None
        # an extra term of J per sequence (seqs -> array), set per vector by ``search``
        self._score: Callable[[list[list[int]]], np.ndarray] | None = None
        self._proposed_key: tuple[Any, tuple[int, ...]] | None = None
        self._proposed: list[list[int]] = []
        self.cls_id, self.sep_id = tok.cls_token_id, tok.sep_token_id
        self.forward_passes = 0
        self._single: torch.Tensor | None = None
        self._limit = 0
        self.lm, self.lm_budget, self.lm_opts = lm, lm_budget, dict(lm_opts or {})
        self.lm_moves, self.use_restart = lm_moves, lm_restart
        if min(words, pool_top, nonword, spans, common) < 0:
            raise LeaklabError(
                f"words, pool_top, nonword, spans and common must be >= 0, "
                f"got {words}, {pool_top}, {nonword}, {spans} and {common}"
            )
        self.spans, self.common = spans, common
        if common_ids is None:
            common_ids = self.vocab[:COMMON_WORDS].tolist() if ranked else []
        self.common_ids = list(dict.fromkeys(common_ids))
        if common > 0 and not self.common_ids:
            raise LeaklabError("option common needs common words: pass common_ids or a vocabulary ranked by frequency")
        self.units = [tuple(u) for u in (units or []) if 1 < len(u) <= max_len]
        self.words, self.pool_top, self.nonword = words, pool_top, nonword
        self._unit_set = set(self.units)
        self._cont = {i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))) if t.startswith("##")}
        self._by_stem: dict[int, list[tuple[int, ...]]] = {}
        self._by_piece: dict[int, list[tuple[int, ...]]] = {}
        for u in self.units:
            self._by_stem.setdefault(u[0], []).append(u)
            for piece in dict.fromkeys(u[1:]):
                self._by_piece.setdefault(piece, []).append(u)

    def single_vectors(self) -> torch.Tensor:
        """e(w) of every prior-vocabulary word alone (computed once, |V| forward passes)."""
        if self._single is None:
            ids = [[w] for w in self.prior_vocab.tolist()]
            self._single = torch.from_numpy(
                np.concatenate([self._embed(ids[i : i + 1024]) for i in range(0, len(ids), 1024)])
            )
        return self._single

    def _embed(self, seqs: list[list[int]]) -> np.ndarray:
        """Encoder vectors of token sequences, counted in ``forward_passes`` (queries: once, in invert())."""
        self.forward_passes += len(seqs)
        before = self.encoder.usage.snapshot()
        if self.black_box:
            vecs = self.encoder.embed([t if t.strip() else "." for t in self.tok.batch_decode(seqs)])
        else:
            vecs = self.encoder.embed_ids(seqs)
        self.encoder.usage.queries = before.queries
        return vecs

    def prior_words(self, target: torch.Tensor) -> list[int]:
        """The ``prior`` words w of the prior vocabulary with the highest cos(e(w), v): the content words of v
        rank there (rare names included), function words do not."""
        if self.prior <= 0:
            return []
        top = torch.topk(self.single_vectors() @ target[0], min(self.prior, len(self.prior_vocab))).indices
        return self.prior_vocab[top].tolist()

    def completions(self, word: list[int]) -> list[tuple[int, ...]]:
        """(option ``words`` = m) up to m multi-piece words u ≠ ``word`` that share its stem (first token) or
        one of its ``##`` pieces: those sharing the stem first, then by the ``##`` pieces in order; within
        each, the most frequent first."""
        if self.words <= 0 or not word:
            return []
        orphan = word[0] in self._cont  # a ``##`` piece with no stem before it (at the start of x)
        stem = [] if orphan else self._by_stem.get(word[0], [])
        lists = [stem, *(self._by_piece.get(p, []) for p in (word if orphan else word[1:]))]
        out = dict.fromkeys(u for lst in lists for u in lst if u != tuple(word))
        return list(out)[: self.words]

    def word_end(self, seq: list[int], pos: int) -> int:
        """One past the last ``##`` continuation that follows ``seq[pos]`` (the end of the word starting there)."""
        end = pos + 1
        while end < len(seq) and seq[end] in self._cont:
            end += 1
        return end

    def cosines(self, seqs: list[list[int]], target: torch.Tensor) -> np.ndarray:
        """cos(e(x), v) of each token sequence (one batched forward pass)."""
        vecs = torch.from_numpy(self._embed(seqs))
        return torch.nn.functional.cosine_similarity(vecs, target.expand_as(vecs)).numpy()

    def objective(self, seqs: list[list[int]], target: torch.Tensor) -> np.ndarray:
        """J(x) = cos(e(x), v) − λ·|x| (− μ·nonwords(x) with option ``nonword`` = μ; + the vector's scorer's
        term, e.g. a conditioned decoder's fluency, where one is set)."""
        cost = self.penalty * np.array([len(s) for s in seqs], dtype=np.float64)
        if self.nonword > 0:
            cost += self.nonword * np.array([self.nonwords(s) for s in seqs])
        if self._score is not None:
            cost -= np.asarray(self._score(seqs), dtype=np.float64)
        return self.cosines(seqs, target) - cost

    def nonwords(self, seq: list[int]) -> int:
        """How many words of ``seq`` are built of several pieces (a token and its ``##`` continuations, or a
        ``##`` piece with no stem) and are not a word of the public split (the unit list): ``age ##felt``
        counts, ``heart ##felt`` does not."""
        count, pos = 0, 0
        while pos < len(seq):
            end = self.word_end(seq, pos)
            if (end - pos > 1 or seq[pos] in self._cont) and tuple(seq[pos:end]) not in self._unit_set:
                count += 1
            pos = end
        return count

    def gradient(self, seq: list[int], target: torch.Tensor) -> torch.Tensor | None:
        """∂cos(e(x), v)/∂(input embedding of x_t) for every position t, shape (|x|, d); None in black-box mode."""
        if self.black_box:
            return None
        ids = torch.tensor([[self.cls_id, *seq, self.sep_id]])
        x = self.emb[ids].clone().requires_grad_(True)
        v = self.encoder.forward_embeds(x, torch.ones_like(ids))
        (g,) = torch.autograd.grad(torch.nn.functional.cosine_similarity(v, target).sum(), x)
        self.forward_passes += 1
        return g[0, 1:-1]

    def proposals(self, seq: list[int], pos: int, g: torch.Tensor | None, pool: list[int] = ()) -> list[list[int]]:
        """Swaps of x_pos, its deletion, its moves to every other place, and insertions before ``pos``.
        White-box mode: the top-K HotFlip words, and the words of ``pool`` (e.g. a bag-of-words guess); option
        ``common`` = m adds the m common words of highest first-order gain. Black-box mode (no gradient to
        screen with): the proposer's words for ``pos``, the pool and the m most frequent common words, for both
        swaps and insertions. Option ``spans`` = s moves the run of 1..s whole words starting at ``pos`` to every
        other word start; option ``words`` proposes word completions."""
        pool = list(dict.fromkeys(pool))
        if self.black_box:
            extra = self.proposed(seq)[pos] if self._propose is not None else []
            swaps = inserts = list(dict.fromkeys([*extra, *pool, *self.common_ids[: self.common]]))
        else:
            swaps, inserts = self.hotflip_words(seq, pos, g, pool)
        out: list[list[int]] = []
        if pos < len(seq):
            out.extend([*seq[:pos], w, *seq[pos + 1 :]] for w in swaps if w != seq[pos])
            if len(seq) > 1:
                rest = seq[:pos] + seq[pos + 1 :]
                out.append(rest)
                out.extend([*rest[:j], seq[pos], *rest[j:]] for j in range(len(rest) + 1) if j != pos)
        if len(seq) < self.max_len:
            out.extend([*seq[:pos], w, *seq[pos:]] for w in inserts)
        return out + self.span_moves(seq, pos) + self.word_moves(seq, pos)

    def proposed(self, seq: list[int]) -> list[list[int]]:
        """The proposer's lists for ``seq``, computed once per sequence (``descend`` asks at every position)."""
        key = (self._propose, tuple(seq))
        if self._proposed_key != key:
            self._proposed_key, self._proposed = key, self._propose(seq)
        return self._proposed

    def hotflip_words(
        self, seq: list[int], pos: int, g: torch.Tensor | None, pool: list[int]
    ) -> tuple[list[int], list[int]]:
        """White-box mode: the words to swap in at ``pos`` (top-K by the first-order gain ⟨g_pos, E_w − E_x_pos⟩,
        the screened pool and common words) and to insert before it (by ⟨ḡ, E_w⟩, ḡ the mean gradient of the
        neighbours; with no gradient, i.e. from the empty text, the top-K by the mean embedding and the pool)."""
        k = min(self.candidates, len(self.vocab))
        swaps: list[int] = []
        if g is not None and pos < len(seq):
            gain = self.sub @ g[pos] - g[pos] @ self.emb[seq[pos]]
            top = self.vocab[torch.topk(gain, k).indices].tolist()
            swaps = list(dict.fromkeys([*top, *self.top_pool(pool, g[pos]), *self.top_common(g[pos])]))
        inserts: list[int] = []
        if len(seq) < self.max_len:
            near = g[max(0, pos - 1) : pos + 1].mean(0) if g is not None else self.sub.mean(0)
            top = self.top_pool(pool, near) if g is not None else pool
            common = self.top_common(near) if g is not None else []
            inserts = list(dict.fromkeys([*self.vocab[torch.topk(self.sub @ near, k).indices].tolist(), *top, *common]))
        return swaps, inserts

    def word_moves(self, seq: list[int], pos: int) -> list[list[int]]:
        """(option ``words``) the completions of the whole word at ``pos`` and, if it has several pieces, its
        deletion."""
        out: list[list[int]] = []
        if self.words > 0 and pos < len(seq) and (pos == 0 or seq[pos] not in self._cont):
            end = self.word_end(seq, pos)
            for u in self.completions(seq[pos:end]):
                if len(seq) - (end - pos) + len(u) <= self.max_len:
                    out.append([*seq[:pos], *u, *seq[end:]])
            if end - pos > 1 and len(seq) > end - pos:
                out.append(seq[:pos] + seq[end:])
        return out

    def top_common(self, direction: torch.Tensor) -> list[int]:
        """(option ``common`` = m) the m common words (``common_ids``: by default the first COMMON_WORDS of the
        given search vocabulary, which ``make_whitebox`` ranks by public-split frequency) of highest first-order
        gain ⟨direction, E_w⟩."""
        if self.common <= 0:
            return []
        top = torch.topk(self.emb[self.common_ids] @ direction, min(self.common, len(self.common_ids))).indices
        return [self.common_ids[i] for i in top.tolist()]

    def word_starts(self, seq: list[int]) -> list[int]:
        """The positions where a word starts (a token that is not a ``##`` continuation, or position 0)."""
        return [i for i, t in enumerate(seq) if i == 0 or t not in self._cont]

    def span_moves(self, seq: list[int], pos: int) -> list[list[int]]:
        """(option ``spans`` = s) the run of n = 1..s whole words starting at ``pos`` moved to every other word
        start of the rest (single one-token words are left out: ``proposals`` moves those already)."""
        if self.spans <= 0 or pos >= len(seq) or (pos > 0 and seq[pos] in self._cont):
            return []
        out: list[list[int]] = []
        starts = [i for i in self.word_starts(seq) if i > pos] + [len(seq)]
        for n in range(1, self.spans + 1):
            if n > len(starts):
                break
            end = starts[n - 1]
            if end - pos == 1 or end - pos == len(seq):
                continue
            span, rest = seq[pos:end], seq[:pos] + seq[end:]
            for j in [*self.word_starts(rest), len(rest)]:
                if j != pos:
                    out.append([*rest[:j], *span, *rest[j:]])
        return out

    def top_pool(self, pool: list[int], direction: torch.Tensor) -> list[int]:
        """(option ``pool_top`` = m) the m pool words of highest first-order gain ⟨direction, E_w⟩ (all of
        them when m is 0 or the pool is no larger): the pool is screened like the vocabulary, not tried whole."""
        if self.pool_top <= 0 or len(pool) <= self.pool_top:
            return pool
        top = torch.topk(self.emb[pool] @ direction, self.pool_top).indices
        return [pool[i] for i in sorted(top.tolist())]

    def _spent(self) -> bool:
        return self._limit > 0 and self.forward_passes >= self._limit

    def descend(self, seq: list[int], best: float, target: torch.Tensor, pool: list[int]) -> tuple[list[int], float]:
        """Coordinate passes from ``seq`` (objective ``best``) until no proposal raises J."""
        for _ in range(self.passes):
            improved, pos = False, 0
            while pos <= len(seq) and not self._spent():
                props = self.proposals(
                    seq, pos, self.gradient(seq, target) if seq else None, pool + self.lm_words(seq, pos)
                )
                if props:
                    scores = self.objective(props, target)
                    b = int(scores.argmax())
                    if scores[b] > best + 1e-5:
                        shorter = len(props[b]) < len(seq)
                        seq, best, improved = props[b], float(scores[b]), True
                        if shorter:
                            continue
                pos += 1
            if not improved or self._spent():
                break
        return seq, best

    def lm_words(self, seq: list[int], pos: int) -> list[int]:
        """(option ``lm_moves``) the LM's top next words after seq[:pos], proposed at ``pos`` like pool words."""
        if self.lm is None or self.lm_moves <= 0:
            return []
        return self.lm.proposals(self.lm.next_logprobs([seq[:pos]])[0], [], self.lm_moves, 0)

    def perturb(self, seq: list[int], pool: list[int]) -> list[int]:
        """A random kick: delete one or two tokens, or replace one by a pool word (basin hopping)."""
        seq = list(seq)
        for _ in range(int(self.rng.integers(1, 3))):
            if len(seq) > 1 and (not pool or self.rng.random() < 0.5):
                del seq[int(self.rng.integers(len(seq)))]
            elif pool and seq:
                seq[int(self.rng.integers(len(seq)))] = pool[int(self.rng.integers(len(pool)))]
        return seq

    def search(
        self,
        seq: list[int],
        target: torch.Tensor,
        pool: list[int] = (),
        propose: Callable[[list[int]], list[list[int]]] | None = None,
        score: Callable[[list[list[int]]], np.ndarray] | None = None,
    ) -> tuple[list[int], float]:
        """Coordinate descent, then ``hops`` perturb-and-descend rounds keeping the best J; returns the
        sequence and its cosine (``propose``: black-box mode's per-position proposals for this vector;
        ``score``: an extra term of J)."""
        self._propose, self._score = propose, score
        pool = list(dict.fromkeys([*pool, *self.prior_words(target)]))
        self._limit = self.forward_passes + self.budget if self.budget > 0 else 0
        seq = list(seq)[: self.max_len]
        best = float(self.objective([seq], target)[0]) if seq else -np.inf
        seq, best = self.descend(seq, best, target, pool)
        for _ in range(self.hops):
            if self._spent():
                break
            kicked = self.perturb(seq, pool)
            cand, score = self.descend(kicked, float(self.objective([kicked], target)[0]), target, pool)
            if score > best + 1e-5:
                seq, best = cand, score
        if self.lm is not None and self.use_restart:
            seq, best = self.lm_restart(seq, best, target, pool)
        self._limit = 0
        self._propose = self._score = None
        return seq, float(self.cosines([seq], target)[0])

    def lm_restart(self, seq: list[int], best: float, target: torch.Tensor, pool: list[int]) -> tuple[list[int], float]:
        """LM beam search over the LM's words and the evidence (``seq`` + ``pool``), then coordinate descent
        from its best text, within ``lm_budget`` encoder passes; the result replaces ``seq`` only if J rises."""
        assert self.lm is not None
        self._limit = self.forward_passes + self.lm_budget if self.lm_budget > 0 else 0
        evidence = list(dict.fromkeys([*seq, *pool]))
        cand, score = lm_beam(
            self.lm,
            lambda s: self.cosines(s, target),
            evidence,
            self.max_len,
            self.penalty,
            spent=self._spent,
            **self.lm_opts,
        )
        if cand:
            cand, score = self.descend(cand, score, target, pool)
        return (cand, score) if score > best + 1e-5 else (seq, best)

    def invert(
        self,
        vectors: np.ndarray,
        init: list[str] | None = None,
        pools: list[str] | None = None,
        proposers: list[Callable[[list[int]], list[list[int]]]] | None = None,
        scorers: list[Callable[[list[list[int]]], np.ndarray]] | None = None,
    ) -> tuple[list[str], list[float]]:
        """Recovered texts and their cosines; ``init``: one starting text per vector (else the empty text);
        ``pools``: per vector, words proposed at every position besides the HotFlip candidates; ``proposers``:
        per vector, black-box mode's per-position proposals; ``scorers``: per vector, an extra term of J."""
        v = torch.from_numpy(check_vectors(vectors, self.encoder.dim, "target vectors"))
        given_lists = (("starting texts", init), ("word pools", pools), ("proposers", proposers), ("scorers", scorers))
        for what, given in given_lists:
            if given is not None and len(given) != len(v):
                raise LeaklabError(f"{len(given)} {what} for {len(v)} vectors")
        tok = self.tok
        starts = tok(init, add_special_tokens=False)["input_ids"] if init else [[] for _ in range(len(v))]
        extra = tok(pools, add_special_tokens=False)["input_ids"] if pools else [[] for _ in range(len(v))]
        start_passes = self.forward_passes
        texts, cosines = [], []
        for j in range(len(v)):
            seq, cos = self.search(
                starts[j], v[j : j + 1], extra[j], proposers[j] if proposers else None, scorers[j] if scorers else None
            )
            texts.append(tok.decode(seq, skip_special_tokens=True))
            cosines.append(cos)
        self.encoder.usage.queries += self.forward_passes - start_passes
        return texts, cosines


def whole_word_ids(tokenizer: Any, pieces: bool = False) -> list[int]:
    """Every whole-word token of the tokenizer's vocabulary (no special or unused slot); with ``pieces`` also
    the ``##`` word-piece continuations (words the vocabulary splits, e.g. ``hap ##ha ##zard``)."""
    special = set(tokenizer.all_special_ids)
    toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        i
        for i, t in enumerate(toks)
        if i not in special and not t.startswith("[") and (pieces or not t.startswith("##")) and t.strip()
    ]


#: options the coordinate search takes under the same name from every attack that runs it
SEARCH_KEYS = ("length_penalty", "passes", "prior", "hops", "words", "nonword", "spans", "common")


def search_kwargs(cfg: Config) -> dict[str, Any]:
    """The :data:`SEARCH_KEYS` options of ``cfg`` as :class:`WhiteBoxInverter` keywords."""
    return {k: getattr(cfg, k) for k in SEARCH_KEYS}


@dataclass(frozen=True)
class WhiteBoxSearch(Config):
    """Options of the white-box coordinate search and its start (the white-box attack's, and kb-extract's with
    ``encoder_known``)."""

    vocab: int = option(8000, "public-split words by frequency in the search vocabulary (0: the whole tokenizer)")
    full: bool = option(False, "add every other whole word of the tokenizer to the vocabulary")
    pieces: bool = option(False, "add the ## word-piece continuations to the vocabulary")
    candidates: int = option(24, "top-K HotFlip swaps and insertions proposed per position")
    length_penalty: float = option(0.01, "λ of J = cos − λ·|x|, per token")
    length: int = option(24, "longest recovered text, in tokens")
    passes: int = option(6, "most coordinate passes per descent")
    prior: int = option(0, "words w of highest cos(e(w), v) proposed at every position")
    hops: int = option(0, "basin-hopping rounds after the descent")
    budget: int = option(0, "encoder passes per vector (0: unlimited)")
    words: int = option(0, "word completion: multi-piece public words tried in place of the word at a position")
    nonword: float = option(0.0, "μ of J − μ per split word that is no public-split word")
    word_corpora: str = option("", "comma-separated corpora whose public multi-piece words join the known words")
    spans: int = option(0, "moves of runs of up to this many whole words")
    common: int = option(0, "common public words of highest first-order gain proposed at every position")
    pool_top: int = option(0, "screen the word pool to this many words of highest first-order gain (0: all)")
    init: Literal["bow", "empty"] = option("bow", "start: the bag-of-words inverter's text and word pool, or nothing")
    pool: int = option(20, "top words of the bag-of-words inverter proposed at every position")
    lm: str = option("", "causal LM of the guided restart (e.g. smollm2-135m; empty: none)")
    lm_budget: int = option(3000, "encoder passes of the LM-guided restart per vector (0: unlimited)")
    lm_restart: bool = option(True, "run the LM-guided restart (with lm)")
    lm_moves: int = option(0, "the LM's top next words proposed at every position (with lm)")
    lm_beams: int = option(6, "beams of the LM-guided restart")
    lm_k_lm: int = option(6, "the LM's next words proposed per beam")
    lm_k_ev: int = option(14, "evidence words proposed per beam, ranked by the LM")
    lm_weight: float = option(0.02, "μ of the LM's mean log-probability in the beam ranking")


@dataclass(frozen=True)
class WhiteBoxConfig(BowTraining, WhiteBoxSearch):
    """Options of the white-box attack: the search, and the bag-of-words inverter of its start."""

    vocab: int = option(8000, "public-split words by frequency in the search vocabulary and the bag-of-words start's")
    max_tokens: int | None = option(None, "longest private target, in tokens (default: the scenario's, at most 16)")

    def target_max_tokens(self, scenario_max: int) -> int:
        """The longest private target the scenario draws for this attack."""
        return self.max_tokens if self.max_tokens is not None else min(scenario_max, 16)


def make_whitebox(public: PublicData, encoder: LocalEncoder, opts: WhiteBoxSearch) -> WhiteBoxInverter:
    """The white-box inverter with options ``opts``: the public-split words by frequency first, then (option
    ``full``) every other whole word of the tokenizer; option ``pieces``: ``##`` continuations too. Options
    ``words``/``nonword`` use the public split's multi-piece words; ``word_corpora`` (comma-separated corpus
    names) appends those of other corpora's public splits."""
    pieces = opts.pieces
    tok = encoder.tokenizer
    texts = public.texts()
    vocab = vocab_from_texts(tok, texts, opts.vocab, whole_words=not pieces) if opts.vocab > 0 else None
    whole = whole_word_ids(tok)
    if vocab is not None and opts.full:
        vocab = list(dict.fromkeys([*vocab, *(whole_word_ids(tok, pieces) if pieces else whole)]))
    common_ids = None
    if opts.common > 0 and vocab is None:  # option vocab=0: the common words still come from the public split
        common_ids = vocab_from_texts(tok, texts, COMMON_WORDS, whole_words=not pieces)
    units = piece_words(tok, texts) if opts.words > 0 or opts.nonword > 0 else None
    if units is not None and opts.word_corpora:
        # more known words from other corpora's public splits, after the scenario's own (most frequent first)
        known = set(units)
        more = piece_words(tok, public.extra_texts(opts.word_corpora, any_length=True))
        units += [u for u in more if u not in known]
    lm = LMPrior(opts.lm, encoder.tokenizer, vocab if vocab is not None else whole) if opts.lm else None
    lm_opts = {"beams": opts.lm_beams, "k_lm": opts.lm_k_lm, "k_ev": opts.lm_k_ev, "weight": opts.lm_weight}
    return WhiteBoxInverter(
        encoder,
        vocab,
        candidates=opts.candidates,
        max_len=opts.length,
        budget=opts.budget,
        seed=public.seed,
        prior_ids=whole,
        lm=lm,
        lm_budget=opts.lm_budget,
        lm_opts=lm_opts,
        lm_moves=opts.lm_moves,
        lm_restart=opts.lm_restart,
        units=units,
        pool_top=opts.pool_top,
        common_ids=common_ids,
        **search_kwargs(opts),
    )


def bow_guesses(
    public: PublicData, encoder: Encoder, vectors: np.ndarray, pool: int, bow: BowTraining
) -> tuple[list[str], list[str]]:
    """Starting texts and per-vector word pools (top ``pool`` words) from a bag-of-words inverter trained
    (options ``bow``) on public pairs."""
    inv, _ = train_bow(public, bow, encoder)
    return inv.invert(vectors), inv.top_words(vectors, pool)


def search_start(
    public: PublicData, encoder: Encoder, vectors: np.ndarray, opts: WhiteBoxSearch, bow: BowTraining
) -> tuple[list[str], list[str]] | tuple[None, None]:
    """The search's starting texts and word pools: the bag-of-words guesses (option ``init=bow``), or none."""
    return bow_guesses(public, encoder, vectors, opts.pool, bow) if opts.init == "bow" else (None, None)


ACCESS = "white-box encoder (gradients) + leaked vectors"


@EMBED_ATTACKS.register("whitebox", config=WhiteBoxConfig, access=ACCESS, case="inversion", needs=("weights",))
def attack(access: Access, public: PublicData, cfg: WhiteBoxConfig) -> Prediction:
    """Batched coordinate search (HotFlip proposals, real-encoder scoring) from a bag-of-words start."""
    targets, enc = access.need("vectors").vectors, access.need("weights").encoder
    inv = make_whitebox(public, enc, cfg)
    starts, pools = search_start(public, enc, targets, cfg, sub_config(BowTraining, cfg))
    pred, cos = inv.invert(targets, starts, pools)
    return Prediction(
        texts=pred,
        measures={"attack_cosine": float(np.mean(cos))},
        notes={
            "vocab_prior": f"{len(inv.vocab)} token ids: public-split whole words by frequency"
            + (", then every other whole word of the tokenizer" if cfg.full else "")
            + (", ## word pieces included (option pieces)" if cfg.pieces else ""),
            "word_prior": f"per vector, the {inv.prior} words w of highest cos(e(w), v), proposed at every position"
            if inv.prior
            else "none",
            "word_completion": f"≤ {inv.words} of {len(inv.units)} multi-piece public-split words sharing the stem "
            "or a ## piece of the word at each position replace it whole"
            if inv.words
            else "none",
            "search": f"≤ {inv.budget or 'unlimited'} encoder passes per vector, {inv.hops} perturbation rounds"
            + (f", pool screened to its {inv.pool_top} best words by first-order gain" if inv.pool_top else ""),
            "length_prior": f"≤ {inv.max_len} tokens, penalty {inv.penalty} per token"
            + (f", {inv.nonword} per split word not in the public split" if inv.nonword else ""),
            "start": "bag-of-words inverter (public pairs): start text + word pool" if starts else "empty text",
            "lm_restart": (
                f"{cfg.lm} beam search ({inv.lm_opts}) + descent, ≤ {inv.lm_budget} encoder passes"
                if inv.lm is not None
                else "none"
            ),
        },
    )
