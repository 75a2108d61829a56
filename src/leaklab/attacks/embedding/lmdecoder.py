"""Generative inversion with a pretrained causal LM (GEIA-style), trainable on one CPU core.

p(x | v) = Π_t softmax(E_V · f_top(h_K(x_<t) + c_K(v)))_{x_t}: the LM's first K layers run frozen (their
states h_K of the public texts are computed once, bf16), the top layers are fine-tuned, and an MLP of the
leaked vector v adds a conditioning vector c_l(v) to the residual stream at the input of every top layer
l ≥ K. The softmax runs over V, the LM tokens that occur in the public texts (E_V: the LM's tied
embedding rows). Decoding is the LM's own beam search (KV cache) with the same additions made by forward
pre-hooks, restricted to V; correction by re-embedding is shared with the GRU decoder.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leaklab.attacks.embedding.correction import CorrectingInverter
from leaklab.attacks.embedding.registry import load_inverter_files, save_inverter
from leaklab.encoders import check_pairs, check_vectors
from leaklab.errors import LeaklabError

START = 0  # "<|endoftext|>" of the SmolLM2 tokenizer: document start and end


class Conditioner(nn.Module):
    """c(v) = W_2 gelu(W_1 v): one residual-stream offset per conditioned layer, shape (B, layers, d)."""

    def __init__(self, dim: int, hidden: int, layers: int, width: int = 1024) -> None:
        super().__init__()
        self.layers, self.hidden = layers, hidden
        self.net = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, layers * hidden))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v).view(-1, self.layers, self.hidden)


class LMDecoderInverter(CorrectingInverter):
    """A copy of a packaged causal LM whose top layers are fine-tuned to generate x from φ(x)."""

    kind = "decoder"
    arch = "lm"

    def __init__(
        self,
        dim: int,
        vocab_ids: list[int],
        base: str = "smollm2-135m",
        top: int = 4,
        max_len: int = 40,
        encoder: str = "",
    ) -> None:
        from leaklab.models import load_model

        loaded = load_model(base)
        self.model = copy.deepcopy(loaded.model).float().eval()
        self.device = loaded.device
        self.tokenizer = loaded.tokenizer
        layers = self.model.model.layers
        if not 1 <= top <= len(layers):
            raise LeaklabError(f"top={top}: the LM '{base}' has {len(layers)} layers (1..{len(layers)} trainable)")
        self.dim, self.base, self.top, self.max_len, self.encoder = dim, base, top, max_len, encoder
        self.split = len(layers) - top
        self.vocab_ids = sorted(set(vocab_ids) | {START})
        self.to_local = torch.full((self.model.config.vocab_size,), -100, dtype=torch.long, device=self.device)
        self.to_local[self.vocab_ids] = torch.arange(len(self.vocab_ids), device=self.device)
        torch.manual_seed(0)
        self.cond = Conditioner(dim, self.model.config.hidden_size, top)
        self.bias = nn.Sequential(nn.Linear(dim, 1024), nn.GELU(), nn.Linear(1024, len(self.vocab_ids)))
        nn.init.zeros_(self.bias[-1].weight)
        nn.init.zeros_(self.bias[-1].bias)
        self.cond.to(self.device)  # initialised on the CPU (same seeded weights on every device), then moved
        self.bias.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.trainable_lm():
            p.requires_grad_(True)
        self._c: torch.Tensor | None = None
        for i, layer in enumerate(layers[self.split :]):
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    @staticmethod
    def tokenizer_of(base: str) -> Any:
        from leaklab.models import load_model

        return load_model(base).tokenizer

    def trainable_lm(self) -> list[nn.Parameter]:
        return [p for layer in self.model.model.layers[self.split :] for p in layer.parameters()] + list(
            self.model.model.norm.parameters()
        )

    def _hook(self, i: int):
        def add(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._c is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            c = self._c[:, i].unsqueeze(1).to(h.dtype)
            if c.shape[0] != h.shape[0]:  # beam search expands each row num_beams times
                c = c.repeat_interleave(h.shape[0] // c.shape[0], 0)
            if args:
                return (h + c, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h + c}

        return add

    @contextlib.contextmanager
    def conditioned(self, v: torch.Tensor) -> Iterator[None]:
        """Within the block, every forward of the LM adds c(v) at the top layers' inputs."""
        self._c = self.cond(v.to(self.device))
        try:
            yield
        finally:
            self._c = None

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the model's device type (the frozen states are stored in bf16 too)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- data
    def encode(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [[START] + row[: self.max_len - 1] + [START] for row in ids]

    def _lower(self, ids: torch.Tensor) -> torch.Tensor:
        """h_K: the residual stream entering layer K (frozen part, right-padded rows, causal attention)."""
        inner = self.model.model
        h = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=h.device)[None]
        rope = inner.rotary_emb(h, position_ids=pos)
        for layer in inner.layers[: self.split]:
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
        return h

    def _upper_logits(self, h: torch.Tensor, v: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """Top layers (with c(v) added by the hooks), final norm, tied head restricted to ``vocab``."""
        inner = self.model.model
        pos = torch.arange(h.shape[1], device=h.device)[None]
        rope = inner.rotary_emb(h, position_ids=pos)
        v = v.to(self.device)
        with self.conditioned(v):
            for layer in inner.layers[self.split :]:
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
        return inner.norm(h) @ self.model.get_output_embeddings().weight[vocab].T + self.bias(v).unsqueeze(1)

    # -- training
    def fit(
        self,
        texts: list[str],
        vectors: np.ndarray,
        seconds: float = 600.0,
        epochs: int = 50,
        batch_size: int = 32,
        lr: float = 3e-4,
        cond_lr: float = 1e-3,
        seed: int = 0,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Teacher-forced cross-entropy over V on public pairs; the frozen states h_K are computed once (bf16)
        inside the ``seconds`` budget, then the top layers and c train with a warm-up + cosine schedule in time."""
        texts, pair_vectors = check_pairs(texts, vectors, self.dim)
        start = time.perf_counter()
        seqs = self.encode(texts)
        order = np.argsort([len(s) for s in seqs], kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        v_all = torch.from_numpy(pair_vectors).to(self.device)
        vocab = torch.tensor(self.vocab_ids, device=self.device)
        params = [
            {"params": self.trainable_lm(), "lr": lr},
            {"params": list(self.cond.parameters()) + list(self.bias.parameters()), "lr": cond_lr},
        ]
        opt = torch.optim.AdamW(params, weight_decay=0.01)
        bases = [g["lr"] for g in opt.param_groups]
        rng = np.random.default_rng(seed)
        steps, epoch, last, cached = 0, 0, float("nan"), []
        with _bar(progress) as bar:
            task = bar.add_task("decoder: frozen LM states", total=len(batches))
            for idx in batches:
                cached.append(self._cache(seqs, idx))
                bar.advance(task)
            cache_s = time.perf_counter() - start
            budget = max(seconds - cache_s, 0.0)
            bar.update(task, description="decoder: training", total=budget, completed=0)
            self.model.train()
            t0 = time.perf_counter()
            while epoch < epochs and time.perf_counter() - t0 < budget:
                for bi in rng.permutation(len(batches)):
                    frac = (time.perf_counter() - t0) / max(budget, 1e-9)
                    if frac >= 1:
                        break
                    scale = min(1.0, (steps + 1) / 30) * 0.5 * (1 + math.cos(math.pi * frac))
                    for g, base in zip(opt.param_groups, bases, strict=True):
                        g["lr"] = base * scale
                    h, tgt = cached[bi]
                    with self.autocast():
                        logits = self._upper_logits(h.float(), v_all[batches[bi]], vocab)
                    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
                    opt.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
                    opt.step()
                    steps, last = steps + 1, loss.item()
                    done = min(time.perf_counter() - t0, budget)
                    bar.update(task, completed=done, description=f"decoder: loss {last:.3f}")
                epoch += 1
        self.model.eval()
        return {
            "train_pairs": len(texts),
            "steps": steps,
            "epochs_started": epoch,
            "final_loss": round(last, 4),
            "frozen_state_seconds": round(cache_s, 1),
            "train_seconds": round(time.perf_counter() - start, 1),
            "arch": self.arch,
            "base": self.base,
            "trained_layers": self.top,
        }

    @torch.no_grad()
    def _cache(self, seqs: list[list[int]], idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(seqs[i]) for i in idx)
        ids = torch.tensor([seqs[i] + [START] * (width - len(seqs[i])) for i in idx], device=self.device)
        with self.autocast():
            h = self._lower(ids[:, :-1])
        tgt = self.to_local[ids[:, 1:]].clone()
        for r, i in enumerate(idx):  # no loss on the padding after each text's end token
            tgt[r, len(seqs[i]) - 1 :] = -100
        return h.to(torch.bfloat16), tgt

    @torch.no_grad()
    def loss(self, texts: list[str], vectors: np.ndarray) -> float:
        """Mean teacher-forced cross-entropy per token, -1/N Σ log p(x_t | x_<t, v) over V (no training)."""
        texts, v = check_pairs(texts, vectors, self.dim)
        seqs = self.encode(texts)
        h, tgt = self._cache(seqs, np.arange(len(seqs)))
        with self.autocast():
            vocab = torch.tensor(self.vocab_ids, device=self.device)
            logits = self._upper_logits(h.float(), torch.from_numpy(v), vocab)
        return float(nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100))

    # -- decoding
    @torch.no_grad()
    def beam_search(self, vectors: np.ndarray, beam: int = 4, chunk: int = 16) -> list[list[str]]:
        """The ``beam`` most probable texts (length-normalised log p(x | v) over V) for each vector."""
        from transformers import LogitsProcessor, LogitsProcessorList

        v = torch.from_numpy(check_vectors(vectors, self.dim, "vectors")).to(self.device)
        vocab = torch.tensor(self.vocab_ids, device=self.device)
        bias = torch.zeros(0)

        class OnlyV(LogitsProcessor):
            """Scores outside V are -inf; inside V the content bias b(v) of each row's vector is added."""

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                out = torch.full_like(scores, -float("inf"))
                out[:, vocab] = scores[:, vocab] + bias.repeat_interleave(len(scores) // len(bias), 0)
                return out

        out: list[list[str]] = []
        for s in range(0, len(v), chunk):
            rows = v[s : s + chunk]
            bias = self.bias(rows)
            with self.conditioned(rows), self.autocast():
                gen = self.model.generate(
                    input_ids=torch.full((len(rows), 1), START, device=self.device),
                    attention_mask=torch.ones(len(rows), 1, dtype=torch.long, device=self.device),
                    num_beams=beam,
                    num_return_sequences=beam,
                    max_new_tokens=self.max_len,
                    do_sample=False,
                    eos_token_id=START,
                    pad_token_id=START,
                    logits_processor=LogitsProcessorList([OnlyV()]),
                )
            texts = self.tokenizer.batch_decode(gen[:, 1:], skip_special_tokens=True)
            out.extend([t.strip() for t in texts[i * beam : (i + 1) * beam]] for i in range(len(rows)))
        return out

    # -- persistence
    def state(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        lm = {f"lm.{names[id(p)]}": p for p in self.trainable_lm()}
        heads = {f"cond.{k}": t for k, t in self.cond.state_dict().items()}
        return lm | heads | {f"bias.{k}": t for k, t in self.bias.state_dict().items()}

    def save(self, folder: str | Path) -> Path:
        """The trained parts only (top layers, final norm, c); the frozen base is the packaged LM."""
        cfg = {
            "arch": self.arch,
            "dim": self.dim,
            "vocab_ids": self.vocab_ids,
            "base": self.base,
            "top": self.top,
            "max_len": self.max_len,
            "encoder": self.encoder,
        }
        return save_inverter(folder, self.kind, self.state(), cfg)

    @classmethod
    def from_saved(cls, state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> LMDecoderInverter:
        inv = cls(cfg["dim"], cfg["vocab_ids"], cfg["base"], cfg["top"], cfg["max_len"], cfg.get("encoder", ""))
        own = inv.state()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise LeaklabError(f"saved LM decoder does not match its config: missing {missing[:3]}, extra {extra[:3]}")
        with torch.no_grad():
            for k, t in state.items():
                if own[k].shape != t.shape:
                    shapes = f"{tuple(t.shape)}, expected {tuple(own[k].shape)}"
                    raise LeaklabError(f"saved LM decoder: {k} has shape {shapes}")
                own[k].copy_(t)
        inv.model.eval()
        return inv

    @classmethod
    def load(cls, folder: str | Path) -> LMDecoderInverter:
        state, cfg = load_inverter_files(folder, cls.kind)
        if cfg.get("arch") != cls.arch:
            raise LeaklabError(f"'{folder}' holds a '{cfg.get('arch', 'gru')}' decoder, not an '{cls.arch}' one")
        return cls.from_saved(state, cfg)


def _bar(enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True, disable=not enabled
    )


def lm_vocab(tokenizer: Any, texts: list[str]) -> list[int]:
    """The LM token ids that occur in the public texts (the decoder's output vocabulary V)."""
    return sorted({i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row})
