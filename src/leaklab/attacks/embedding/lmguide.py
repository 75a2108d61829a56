"""A causal LM as the fluency prior and proposal distribution of the white-box inverter.

Words are the encoder's whole-word tokens w; the LM reads a word sequence as the text
``<start>`` + piece(w_1) + piece(w_2) + … (piece: " w", or "w" for punctuation), so
log p_LM(w | x) is read off the LM's next-token distribution after x. A word that the LM splits into several
tokens is scored by its first token (one LM pass per prefix; :meth:`LMPrior.sequence_logprob` gives the
exact value).

The LM-guided stage (:func:`lm_beam`) generates left to right: every beam x proposes x + w for the LM's top
next words and for the evidence words W (the coordinate-search result, the bag-of-words pool, the prior
words) ranked by the LM; all proposals are scored by one batched encoder pass and beams are ranked by
cos(e(x), v) + μ·mean_t log p_LM(x_t | x_<t); every proposal's J = cos − λ·|x| is tracked and the best
is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from leaklab.errors import LeaklabError


def _piece(token: str) -> str:
    """How an encoder word is written in running text: a leading space unless it is punctuation."""
    return f" {token}" if token[:1].isalnum() else token


def _start_id(tokenizer: Any) -> int:
    """The document-start token: ``<|endoftext|>`` where the vocabulary has it (SmolLM2, GPT-2), else BOS."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        return eot
    return int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)


class LMPrior:
    """Next-word log-probabilities of a causal LM over an encoder's words."""

    def __init__(self, lm: str, enc_tokenizer: Any, word_ids: Sequence[int], top: int = 8) -> None:
        from leaklab.models import load_model

        loaded = load_model(lm)
        if not loaded.adapter.is_causal:
            raise LeaklabError(f"the LM prior needs a causal LM, {lm} is not one")
        self.model, self.tokenizer, self.top = loaded.model, loaded.tokenizer, top
        self.start = _start_id(self.tokenizer)
        words = list(dict.fromkeys(int(w) for w in word_ids))
        toks = enc_tokenizer.convert_ids_to_tokens(words)
        pieces = self.tokenizer([_piece(t) for t in toks], add_special_tokens=False)["input_ids"]
        self.pieces: dict[int, list[int]] = {w: p for w, p in zip(words, pieces, strict=True) if p}
        self.first = torch.full((max(self.pieces) + 1,), 0, dtype=torch.long)
        for w, p in self.pieces.items():
            self.first[w] = p[0]
        # LM token -> encoder word, for words the LM writes as one token (the LM's own proposals)
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.word_of = torch.full((vocab,), -1, dtype=torch.long)
        for w, p in self.pieces.items():
            if len(p) == 1 and self.word_of[p[0]] < 0:
                self.word_of[p[0]] = w
        self.lm_passes = 0

    def lm_ids(self, seq: Sequence[int]) -> list[int]:
        """The LM token ids of a word sequence, after the start token."""
        out = [self.start]
        for w in seq:
            out.extend(self.pieces.get(int(w), []))
        return out

    @torch.no_grad()
    def next_logprobs(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """log p_LM(· | x) over LM tokens for each word sequence x (one right-padded batch), shape (B, V)."""
        rows = [self.lm_ids(s) for s in seqs]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.start] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
        self.lm_passes += len(rows)
        return torch.log_softmax(self.model.get_output_embeddings()(last).float(), dim=-1)

    def word_logprobs(self, logp: torch.Tensor, words: Sequence[int]) -> torch.Tensor:
        """First-token log-probability of each word under one next-token distribution."""
        return logp[self.first[torch.tensor(list(words), dtype=torch.long)]]

    def proposals(self, logp: torch.Tensor, evidence: Sequence[int], k_lm: int, k_ev: int) -> list[int]:
        """The LM's top ``k_lm`` next words, then the ``k_ev`` evidence words the LM ranks highest."""
        top = torch.topk(logp, min(len(logp), 4 * k_lm + 16)).indices
        mapped = [int(w) for w in self.word_of[top].tolist() if w >= 0][:k_lm]
        ev = [w for w in dict.fromkeys(evidence) if w in self.pieces]
        if ev and k_ev > 0:
            lp = self.word_logprobs(logp, ev)
            mapped += [ev[i] for i in torch.topk(lp, min(k_ev, len(ev))).indices.tolist()]
        return list(dict.fromkeys(mapped))

    @torch.no_grad()
    def sequence_logprob(self, seq: Sequence[int]) -> float:
        """Exact Σ_t log p_LM(token_t | tokens_<t) of a word sequence's LM tokens (every token counted)."""
        ids = torch.tensor([self.lm_ids(seq)])
        logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        return float(logp.gather(1, ids[0, 1:, None]).sum())


def lm_beam(
    prior: LMPrior,
    score: Callable[[list[list[int]]], np.ndarray],
    evidence: Sequence[int],
    max_len: int,
    penalty: float,
    beams: int = 6,
    k_lm: int = 6,
    k_ev: int = 14,
    weight: float = 0.02,
    patience: int = 3,
    spent: Callable[[], bool] = lambda: False,
) -> tuple[list[int], float]:
    """Left-to-right beam search: every beam x proposes x + w for the LM's top ``k_lm`` next words and the
    ``k_ev`` evidence words the LM ranks highest; proposals are scored by one batched encoder pass per step
    and ranked by cos(e(x), v) + μ·mean_t log p_LM(x_t | x_<t). Returns the proposal of highest
    J = cos − λ·|x| and its J (stops ``patience`` steps after J last rose)."""
    cand: list[tuple[list[int], float]] = [([], 0.0)]  # (sequence, Σ first-token log p_LM)
    best_seq: list[int] = []
    best_j, stale = -np.inf, 0
    for step in range(1, max_len + 1):
        logp = prior.next_logprobs([x for x, _ in cand])
        props: list[list[int]] = []
        lps: list[float] = []
        for (x, lp), row in zip(cand, logp, strict=True):
            nexts = prior.proposals(row, evidence, k_lm, k_ev)
            props += [[*x, w] for w in nexts]
            lps += [lp + p for p in prior.word_logprobs(row, nexts).tolist()]
        if not props:
            break
        cos = score(props)
        j = cos - penalty * step
        b = int(j.argmax())
        if j[b] > best_j + 1e-6:
            best_seq, best_j, stale = props[b], float(j[b]), 0
        else:
            stale += 1
        order = np.argsort(-(cos + weight * np.array(lps) / step), kind="stable")
        cand = [(props[i], lps[i]) for i in order[:beams]]
        if stale >= patience or spent():
            break
    return best_seq, best_j
