"""Generative inversion: a small decoder conditioned on the vector, trained on the fly on public text, then
iterative correction (vec2text's idea, without a second model).

- decoder: GRU language model over the encoder's word pieces; h_0 = tanh(W v) and v's projection is fed at
  every step, so p(x | v) = Π_t p(x_t | x_<t, v); trained by cross-entropy on public (text, φ(text)) pairs.
- correction (:mod:`leaklab.attacks.embedding.correction`): each round re-embeds the hypotheses h (black-box
  queries, counted), decodes again from the pushed target u = v + α (v − φ(h)) and tries dropping each word;
  the ``beam`` hypotheses closest to v (cosine) survive.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from leaklab.attacks.embedding.access import Access, Prediction, PublicData
from leaklab.attacks.embedding.bow import BowTraining
from leaklab.attacks.embedding.correction import CorrectingInverter
from leaklab.attacks.embedding.lmdecoder import LMDecoderInverter, lm_vocab
from leaklab.attacks.embedding.registry import (
    EMBED_ATTACKS,
    SavedInverter,
    load_inverter_files,
    load_or_train,
    save_inverter,
)
from leaklab.attacks.embedding.whitebox import (
    COMMON_WORDS,
    WhiteBoxInverter,
    bow_guesses,
    piece_words,
    search_kwargs,
    vocab_from_texts,
    whole_word_ids,
)
from leaklab.core import Config, option
from leaklab.encoders import Encoder, check_pairs, check_vectors
from leaklab.errors import LeaklabError

PAD, BOS, EOS, UNK = 0, 1, 2, 3


class GRUDecoder(nn.Module):
    """p(x_t | x_<t, v) with h_0 = tanh(W_h v) and [E x_{t-1}; W_c v] as the step input; tied output."""

    def __init__(self, dim: int, vocab: int, emb: int = 192, hidden: int = 384) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.init_h = nn.Linear(dim, hidden)
        self.cond = nn.Linear(dim, emb)
        self.gru = nn.GRU(2 * emb, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, emb)

    def forward(self, v: torch.Tensor, inputs: torch.Tensor, h: torch.Tensor | None = None):
        x = self.embed(inputs)
        c = self.cond(v).unsqueeze(1).expand(-1, x.shape[1], -1)
        if h is None:
            h = torch.tanh(self.init_h(v)).unsqueeze(0)
        out, h = self.gru(torch.cat([x, c], -1), h)
        return self.proj(out) @ self.embed.weight.T, h


class DecoderInverter(CorrectingInverter):
    """GRU decoder: train, decode (beam search) and correct with re-embedding."""

    kind = "decoder"
    arch = "gru"

    def __init__(
        self,
        dim: int,
        piece_ids: list[int],
        tokenizer: Any,
        emb: int = 192,
        hidden: int = 384,
        max_len: int = 34,
        encoder: str = "",
    ) -> None:
        if not piece_ids:
            raise LeaklabError("decoder vocabulary is empty")
        self.dim, self.piece_ids, self.tokenizer = dim, list(piece_ids), tokenizer
        self.emb, self.hidden, self.max_len, self.encoder = emb, hidden, max_len, encoder
        self.to_local = {p: i + 4 for i, p in enumerate(self.piece_ids)}
        torch.manual_seed(0)
        self.model = GRUDecoder(dim, len(self.piece_ids) + 4, emb, hidden)

    # -- data
    def encode(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[self.to_local.get(i, UNK) for i in row][: self.max_len - 1] + [EOS] for row in ids]

    def decode(self, local: list[int]) -> str:
        pieces = [self.piece_ids[i - 4] for i in local if i >= 4]
        return self.tokenizer.decode(pieces, skip_special_tokens=True)

    # -- training
    def fit(
        self,
        texts: list[str],
        vectors: np.ndarray,
        seconds: float = 180.0,
        epochs: int = 50,
        batch_size: int = 32,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Teacher-forced cross-entropy on public pairs, length-bucketed batches; stops at ``seconds``."""
        texts, pair_vectors = check_pairs(texts, vectors, self.dim)
        v = torch.from_numpy(pair_vectors)
        seqs = self.encode(texts)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng = np.random.default_rng(seed)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        crit = nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.02)
        start, steps, done, last = time.perf_counter(), 0, 0, float("nan")
        self.model.train()
        while done < epochs and time.perf_counter() - start < seconds:
            for bi in rng.permutation(len(batches)):
                idx = batches[bi]
                width = max(len(seqs[i]) for i in idx)
                tgt = torch.tensor([seqs[i] + [PAD] * (width - len(seqs[i])) for i in idx])
                inp = torch.cat([torch.full((len(idx), 1), BOS), tgt[:, :-1]], 1)
                logits, _ = self.model(v[idx], inp)
                loss = crit(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                steps, last = steps + 1, loss.item()
                if time.perf_counter() - start > seconds:
                    break
            done += 1
        self.model.eval()
        return {
            "train_pairs": len(texts),
            "steps": steps,
            "epochs_started": done,
            "final_loss": round(last, 4),
            "train_seconds": round(time.perf_counter() - start, 1),
        }

    # -- decoding
    @torch.no_grad()
    def beam_search(self, vectors: np.ndarray, beam: int = 4) -> list[list[str]]:
        """The ``beam`` most probable texts (by length-normalised log p(x | v)) for each vector."""
        v = torch.from_numpy(check_vectors(vectors, self.dim, "vectors"))
        out = []
        for row in v:
            out.append([self.decode(s) for s in self._beam_one(row, beam)])
        return out

    def _beam_one(self, v: torch.Tensor, beam: int) -> list[list[int]]:
        alive: list[tuple[float, list[int], torch.Tensor | None]] = [(0.0, [BOS], None)]
        done: list[tuple[float, list[int]]] = []
        for _ in range(self.max_len):
            if not alive:
                break
            inputs = torch.tensor([[s[-1]] for _, s, _ in alive])
            h = None if alive[0][2] is None else torch.cat([hh for _, _, hh in alive], 1)
            logits, h_new = self.model(v.expand(len(alive), -1), inputs, h)
            logp = torch.log_softmax(logits[:, -1], -1)
            logp[:, [PAD, BOS, UNK]] = -1e9
            scores = torch.tensor([s for s, _, _ in alive])[:, None] + logp
            top = torch.topk(scores.flatten(), min(beam * 2, scores.numel()))
            nxt = []
            for sc, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                bi, tok = divmod(flat, logp.shape[1])
                seq = alive[bi][1] + [tok]
                if tok == EOS:
                    done.append((sc / len(seq), seq))
                elif len(nxt) < beam:
                    nxt.append((sc, seq, h_new[:, bi : bi + 1]))
            alive = nxt
            if len(done) >= beam:
                break
        done.extend((sc / len(seq), seq) for sc, seq, _ in alive)
        return [s for _, s in sorted(done, key=lambda d: -d[0])[:beam]]

    @torch.no_grad()
    def position_candidates(self, vector: np.ndarray, seq: list[int], k: int) -> list[list[int]]:
        """For t = 0..|seq|, the ``k`` most probable tokens x_t given seq[:t] and the vector (one teacher-forced
        pass; ``seq`` and the result are the encoder tokenizer's ids, tokens outside the decoder's vocabulary
        read as unknown)."""
        inp = torch.tensor([[BOS, *(self.to_local.get(i, UNK) for i in seq)]])
        logits, _ = self.model(torch.as_tensor(vector, dtype=torch.float32).view(1, -1), inp)
        logits = logits[0].clone()
        logits[:, [PAD, BOS, EOS, UNK]] = -torch.inf
        top = torch.topk(logits, min(k, logits.shape[1] - 4)).indices
        return [[self.piece_ids[i - 4] for i in row] for row in top.tolist()]

    @torch.no_grad()
    def mean_logprob(self, vector: np.ndarray, seqs: list[list[int]]) -> np.ndarray:
        """(1/(|x|+1))·log p(x, end | v) of each token sequence (the encoder tokenizer's ids, tokens outside the
        decoder's vocabulary read as unknown), one batched teacher-forced pass."""
        rows = [[self.to_local.get(i, UNK) for i in s] + [EOS] for s in seqs]
        width = max(len(r) for r in rows)
        tgt = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        inp = torch.cat([torch.full((len(rows), 1), BOS), tgt[:, :-1]], 1)
        v = torch.as_tensor(vector, dtype=torch.float32).view(1, -1).expand(len(rows), -1)
        logits, _ = self.model(v, inp)
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        mask = (tgt != PAD).float()
        return ((logp * mask).sum(1) / mask.sum(1)).numpy()

    # -- persistence
    def save(self, folder: str | Path) -> Path:
        return save_inverter(
            folder,
            self.kind,
            self.model.state_dict(),
            {
                "arch": self.arch,
                "dim": self.dim,
                "piece_ids": self.piece_ids,
                "emb": self.emb,
                "hidden": self.hidden,
                "max_len": self.max_len,
                "encoder": self.encoder,
                "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
            },
        )

    @classmethod
    def load(cls, folder: str | Path, tokenizer: Any) -> DecoderInverter:
        state, cfg = load_inverter_files(folder, cls.kind)
        if cfg.get("arch", "gru") != cls.arch:
            raise LeaklabError(f"'{folder}' holds an '{cfg.get('arch')}' decoder, not a '{cls.arch}' one")
        return cls.from_saved(state, cfg, tokenizer)

    @classmethod
    def from_saved(cls, state: dict[str, Any], cfg: dict[str, Any], tokenizer: Any) -> DecoderInverter:
        inv = cls(
            cfg["dim"],
            cfg["piece_ids"],
            tokenizer,
            cfg["emb"],
            cfg["hidden"],
            cfg["max_len"],
            cfg.get("encoder", ""),
        )
        inv.model.load_state_dict(state)
        inv.model.eval()
        return inv


def piece_vocab(tokenizer: Any, texts: list[str], size: int) -> list[int]:
    """The ``size`` most frequent word-piece ids of the public texts."""
    counts = Counter(i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row)
    return [i for i, _ in counts.most_common(size)]


def nearest_texts(texts: list[str], vecs: np.ndarray, targets: np.ndarray, k: int) -> list[list[str]]:
    """The ``k`` public texts closest (cosine) to each target vector."""
    a = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
    top = np.argsort(-(targets @ a.T), axis=1)[:, :k]
    return [[texts[j] for j in row] for row in top]


@dataclass(frozen=True)
class DecoderTraining(Config):
    """Options of training a decoder inverter (the decoder attack's, and alignment's inner decoder's)."""

    arch: Literal["gru", "lm"] = option("gru", "gru: trained from scratch; lm: a packaged pretrained causal LM")
    base: str = option("smollm2-135m", "arch=lm: the packaged LM")
    layers: int = option(2, "arch=lm: top layers fine-tuned")
    train_seconds: float | None = option(None, "whole training budget in seconds (default: 600 for lm, 180 for gru)")
    lr: float = option(2e-4, "arch=lm: learning rate of the LM's top layers")
    cond_lr: float = option(3e-3, "arch=lm: learning rate of the vector conditioning")
    progress: bool = option(True, "arch=lm: show a progress bar")
    vocab: int = option(4000, "arch=gru: most frequent public word pieces the decoder writes")
    emb: int = option(128, "arch=gru: token embedding width")
    hidden: int = option(256, "arch=gru: GRU state width")
    epochs: int = option(50, "arch=gru: most epochs")


def train_decoder(
    public: PublicData,
    opts: DecoderTraining | None,
    encoder: Encoder,
    pairs: tuple[list[str], np.ndarray] | None = None,
) -> tuple[CorrectingInverter, dict[str, Any]]:
    """Option ``arch``: ``lm`` (a packaged pretrained LM, option ``base``, top ``layers`` fine-tuned) or ``gru``
    (trained from scratch); ``train_seconds`` is the whole training budget (``opts``, default: the defaults).
    Trained on ``pairs``, else on public pairs made through ``encoder``."""
    opts = opts or DecoderTraining()
    enc = encoder
    texts, vecs = pairs or public.pairs(enc)
    if opts.arch == "lm":
        from leaklab.models import load_model

        lm = LMDecoderInverter(
            enc.dim, lm_vocab(load_model(opts.base).tokenizer, texts), opts.base, opts.layers, 40, enc.name
        )
        info = lm.fit(
            texts,
            vecs,
            seconds=opts.train_seconds if opts.train_seconds is not None else 600.0,
            lr=opts.lr,
            cond_lr=opts.cond_lr,
            seed=public.seed,
            progress=opts.progress,
        )
        return lm, info
    inv = DecoderInverter(
        enc.dim,
        piece_vocab(public.tokenizer, texts, opts.vocab),
        public.tokenizer,
        opts.emb,
        opts.hidden,
        public.max_tokens + 2,
        enc.name,
    )
    seconds = opts.train_seconds if opts.train_seconds is not None else 180.0
    info = inv.fit(texts, vecs, seconds=seconds, epochs=opts.epochs, seed=public.seed)
    info["arch"] = "gru"
    return inv, info


def load_decoder(folder: str | Path, tokenizer: Any) -> CorrectingInverter:
    """A saved decoder of either arch (``tokenizer``: the encoder's, used by the GRU arch only)."""
    state, cfg = load_inverter_files(folder, "decoder")
    if cfg.get("arch", "gru") == "lm":
        return LMDecoderInverter.from_saved(state, cfg)
    return DecoderInverter.from_saved(state, cfg, tokenizer)


@dataclass(frozen=True)
class DecoderConfig(SavedInverter, DecoderTraining):
    """Options of the decoder attack: training, correction, and the black-box search that refines it."""

    beam: int = option(4, "beam width of decoding and correction")
    steps: int = option(3, "correction rounds by re-embedding (0: none)")
    seeds: int = option(2, "nearest public texts added as starting hypotheses per vector")
    edits: int = option(0, "word substitutions and insertions tried per correction round")
    search: int = option(0, "black-box coordinate search after the correction: queries per vector (0: none)")
    init: Literal["bow", "decoder"] = option(
        "bow", "search start: also a bag-of-words inverter's, or the decoder's only"
    )
    fluency: float = option(0.0, "search: β of + β·mean log p_dec(x | v) in J")
    candidates: int = option(8, "search: the decoder's most probable tokens proposed per position")
    pool: int = option(20, "search: evidence words (and bag-of-words top words) proposed at every position")
    prior: int = option(40, "search: words w of highest cos(e(w), v) proposed at every position")
    common: int = option(20, "search: most frequent public tokens proposed at every position")
    words: int = option(20, "search: word completion (as for the white-box attack)")
    nonword: float = option(0.01, "search: μ per split word that is no public-split word")
    length_penalty: float = option(0.01, "search: λ of J = cos − λ·|x|, per token")
    passes: int = option(6, "search: most coordinate passes per descent")
    hops: int = option(6, "search: basin-hopping rounds")
    spans: int = option(2, "search: moves of runs of up to this many whole words")


def search_refine(
    public: PublicData,
    cfg: DecoderConfig,
    enc: Encoder,
    inv: CorrectingInverter,
    targets: np.ndarray,
    starts: list[str],
    evidence: list[list[str]],
) -> tuple[list[str], dict[str, int]]:
    """Option ``search`` = n: the white-box inverter's coordinate search in black-box mode (texts in, vectors
    out, no gradient) from each corrected text, ≤ n queries per vector. Proposals at each position: the GRU
    decoder's ``candidates`` most probable tokens there given the prefix and v; the ``pool`` words of the
    vector's other hypotheses (``evidence``: beam and seed texts) most often there and not in the start; the
    ``prior`` words w of highest cos(e(w), v); the ``common`` most frequent public tokens; (option ``init`` =
    ``bow``, the default; ``decoder`` leaves it out) the ``pool`` top words of a bag-of-words inverter trained on
    the public pairs, whose text also replaces the start where its J is higher. Options ``hops``, ``spans``,
    ``words``, ``nonword``, ``length_penalty`` and ``passes`` as for the white-box attack. Option ``fluency`` = β
    adds β·(1/(|x|+1))·log p_dec(x, end | v) to J: the decoder's word order. Returns the texts and
    the usage of the bag-of-words training (public pairs, apart from the search's queries)."""
    tok = public.tokenizer
    texts = public.texts()
    searcher = WhiteBoxInverter(
        enc,
        vocab_from_texts(tok, texts, COMMON_WORDS, whole_words=False),
        max_len=public.max_tokens,
        budget=cfg.search,
        seed=public.seed,
        prior_ids=whole_word_ids(tok),
        units=piece_words(tok, texts) if cfg.words > 0 or cfg.nonword > 0 else None,
        tokenizer=tok,
        **search_kwargs(cfg),
    )
    k, size = cfg.candidates, cfg.pool
    bow_pools, bow_usage = [""] * len(starts), {"queries": 0, "calls": 0, "tokens": 0}
    if cfg.init == "bow":
        # a bag-of-words inverter (its own defaults; public pairs only): its text is a second start, the one of
        # higher J is kept, and its top words join the pool
        before = enc.usage.snapshot()
        bow_starts, bow_pools = bow_guesses(public, enc, targets, size, BowTraining())
        bow_usage = enc.usage.since(before)
        ids = tok([*starts, *bow_starts], add_special_tokens=False)["input_ids"]
        starts = list(starts)
        for j in range(len(starts)):
            v = torch.from_numpy(targets[j : j + 1])
            pair = [ids[j][: public.max_tokens], ids[len(starts) + j][: public.max_tokens]]
            if all(pair) and searcher.objective(pair, v).argmax() == 1:
                starts[j] = bow_starts[j]
    pools = []
    for start, hyps, extra in zip(starts, evidence, bow_pools, strict=True):
        have = set(tok(start, add_special_tokens=False)["input_ids"])
        rows = tok(hyps, add_special_tokens=False)["input_ids"]
        words = (i for row in rows for i in set(row) - have if not tok.convert_ids_to_tokens(i).startswith("##"))
        counts = Counter(words)
        pools.append(" ".join([extra, tok.decode([i for i, _ in counts.most_common(size)])]))
    proposers = scorers = None
    if k > 0 and hasattr(inv, "position_candidates"):
        proposers = [lambda seq, v=v: inv.position_candidates(v, seq, k) for v in targets]
    fluency = cfg.fluency
    if fluency > 0 and hasattr(inv, "mean_logprob"):
        scorers = [lambda seqs, v=v: fluency * inv.mean_logprob(v, seqs) for v in targets]
    found, _ = searcher.invert(targets, starts, pools, proposers, scorers)
    return found, bow_usage


ACCESS = "black-box embed (public texts, corrections) + leaked vectors"


@EMBED_ATTACKS.register("decoder", config=DecoderConfig, access=ACCESS, case="inversion", needs=("encoder",))
def attack(access: Access, public: PublicData, cfg: DecoderConfig) -> Prediction:
    """Decoder (pretrained LM, top layers fine-tuned; or GRU) trained on public pairs + correction by re-embedding."""
    targets, enc = access.need("vectors").vectors, access.need("encoder")
    before = enc.usage.snapshot()
    pairs = public.pairs(enc)
    inv, info = load_or_train(
        enc,
        cfg,
        lambda folder: load_decoder(folder, public.tokenizer),
        lambda: train_decoder(public, cfg, enc, pairs),
    )
    train_usage = enc.usage.since(before)
    mid = enc.usage.snapshot()
    beam, steps, edits, search = cfg.beam, cfg.steps, cfg.edits, cfg.search
    base = inv.invert(targets, None, beam=beam)
    seeds = nearest_texts(*pairs, targets, cfg.seeds)
    pred = inv.invert(targets, enc, steps=steps, beam=beam, seeds=seeds, edits=edits) if steps > 0 else base
    variants = {"base": base}
    bow_usage = {"queries": 0}
    if search > 0:
        variants["corrected"] = pred
        hyps = inv.beam_search(targets, beam)
        evidence = [h + s for h, s in zip(hyps, seeds, strict=True)]
        pred, bow_usage = search_refine(public, cfg, enc, inv, targets, pred, evidence)
    attack_usage = enc.usage.since(mid)
    info.update(
        {
            "training_usage": train_usage,
            "search_bow_training_usage": bow_usage,
            "correction_steps": steps,
            "correction_edits": edits,
            "search_budget": search,
        }
    )
    return Prediction(
        texts=pred,
        variants=variants,
        measures={"correction_queries_per_target": (attack_usage["queries"] - bow_usage["queries"]) / len(targets)},
        notes={
            "train_data": "public split only",
            "correction_seeds": "nearest public texts (already embedded for training)",
            "search": (
                f"black-box coordinate search from the corrected text, ≤ {search} queries per vector; proposals: "
                "the decoder's top next tokens at each position, words of its beam and seeds, the words w of "
                "highest cos(e(w), v) (every whole word of the tokenizer embedded once, queries counted), "
                "common public words"
            )
            if search > 0
            else "none",
        },
        info=info,
    )
