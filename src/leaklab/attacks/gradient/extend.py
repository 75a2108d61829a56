"""Fast first-block extension for RoPE (Llama-like) models: the layer-1 MLP input of prefix + [v] for
every prefix and every candidate token v at once.

The generic path (:func:`leaklab.attacks.gradient.subspace.pair_module_inputs`) runs one Hugging Face forward
per extension. Here the token-only parts are computed once per candidate set — embedding, first norm and
the Q/K/V projections (RoPE rotates them by position afterwards) — and per step only the new position's
attention over each prefix's cached keys and values, the output projection and the post-attention norm
remain. Every instance checks itself against the generic path on a sample and refuses to be used if they
disagree (then callers fall back to the generic path).
"""

from __future__ import annotations

import torch
from torch import nn

from leaklab.attacks.gradient.subspace import pair_module_inputs
from leaklab.models.adapter import FamilyAdapter

#: relative disagreement with the generic path above which the fast path is not used
TOLERANCE = 1e-4


class RopeExtender:
    """Post-attention hidden state (input of block 0's MLP) at position p of prefixes[i] + [tokens[j]]."""

    def __init__(self, adapter: FamilyAdapter, tokens: torch.Tensor) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.adapter = adapter
        self.rotate = apply_rotary_pos_emb
        block = adapter.blocks[0]
        self.attn: nn.Module = block.self_attn
        self.norm_in: nn.Module = block.input_layernorm
        self.norm_post: nn.Module = block.post_attention_layernorm
        self.rotary: nn.Module = _rotary(adapter.model)
        self.tokens = tokens
        self.hd = adapter.head_dim
        self.kvh = adapter.num_kv_heads
        self.group = adapter.num_heads // adapter.num_kv_heads
        self.scaling = float(getattr(self.attn, "scaling", self.hd**-0.5))
        with torch.no_grad():
            emb = adapter.embeddings(tokens)
            x = self.norm_in(emb)
            m = tokens.numel()
            self.emb = emb
            self.q = self.attn.q_proj(x).view(m, adapter.num_heads, self.hd)
            self.k = self.attn.k_proj(x).view(m, self.kvh, self.hd)
            self.v = self.attn.v_proj(x).view(m, self.kvh, self.hd)

    @classmethod
    def build(cls, adapter: FamilyAdapter, tokens: torch.Tensor) -> RopeExtender | None:
        """An extender that matches the generic path on a sample, or None for models it does not fit."""
        block = adapter.blocks[0]
        needed = ("self_attn", "input_layernorm", "post_attention_layernorm")
        if adapter.position != "rope" or not all(hasattr(block, n) for n in needed) or tokens.numel() == 0:
            return None
        try:
            ext = cls(adapter, tokens)
            ok = ext.self_check()
        except (AttributeError, RuntimeError, TypeError, ValueError, ImportError):
            return None
        return ext if ok else None

    def self_check(self) -> bool:
        gen = torch.Generator(device="cpu").manual_seed(0)
        dev = self.tokens.device
        prefixes = self.tokens[torch.randint(self.tokens.numel(), (2, 3), generator=gen, device="cpu").to(dev)]
        cols = torch.randint(self.tokens.numel(), (5,), generator=gen, device="cpu").to(dev)
        rows = torch.tensor([0, 1, 0, 1, 1], device=dev)
        fast = self.pairs(prefixes, rows, cols)
        (slow,) = pair_module_inputs(
            self.adapter, prefixes, rows, self.tokens[cols], [self.adapter.mlp_inputs(0).module], 1
        )
        return bool(((fast - slow).norm(dim=-1) <= TOLERANCE * slow.norm(dim=-1)).all())

    @torch.no_grad()
    def _prefix_cache(self, prefixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache()
        stop = [self.adapter.projections[1].module]
        self.adapter.module_inputs(prefixes, stop, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        return layer.keys, layer.values  # (n, kvh, p, hd), RoPE applied to the keys

    @torch.no_grad()
    def pairs(self, prefixes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(k, d) MLP inputs of prefixes[rows[i]] + [self.tokens[cols[i]]]."""
        keys, values = self._prefix_cache(prefixes)
        return self._extend(keys, values, prefixes.shape[1], rows, cols)

    @torch.no_grad()
    def all_pairs(self, prefixes: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(n, m, d) MLP inputs of every prefix + every candidate token."""
        n, m = prefixes.shape[0], self.tokens.numel()
        keys, values = self._prefix_cache(prefixes)
        dev = self.adapter.device
        rows = torch.arange(n, device=dev).repeat_interleave(m)
        cols = torch.arange(m, device=dev).repeat(n)
        out = torch.empty(n * m, self.adapter.hidden_size, dtype=self.emb.dtype, device=dev)
        for s in range(0, n * m, chunk):
            out[s : s + chunk] = self._extend(keys, values, prefixes.shape[1], rows[s : s + chunk], cols[s : s + chunk])
        return out.view(n, m, -1)

    def _extend(self, keys, values, p: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        k = rows.numel()
        pos = torch.full((k, 1), p, device=rows.device)
        cos, sin = self.rotary(self.emb[:1], pos)  # (k, 1, hd)
        q = self.q[cols].view(k, -1, 1, self.hd)  # (k, H, 1, hd)
        kn = self.k[cols].view(k, self.kvh, 1, self.hd)
        q, kn = self.rotate(q, kn, cos, sin)
        q = q.view(k, self.kvh, self.group, self.hd)
        kn = kn.view(k, self.kvh, self.hd)
        kp, vp = keys[rows], values[rows]  # (k, kvh, p, hd)
        s_pre = torch.einsum("bkgd,bkpd->bkgp", q, kp)
        s_new = torch.einsum("bkgd,bkd->bkg", q, kn).unsqueeze(-1)
        att = torch.softmax(torch.cat([s_pre, s_new], dim=-1) * self.scaling, dim=-1)
        out = torch.einsum("bkgp,bkpd->bkgd", att[..., :-1], vp) + att[..., -1:] * self.v[cols].unsqueeze(2)
        h = self.emb[cols] + self.attn.o_proj(out.reshape(k, -1))
        return self.norm_post(h)


def _rotary(model: nn.Module) -> nn.Module:
    for name, mod in model.named_modules():
        if "rotary" in name.lower() or "rotary" in type(mod).__name__.lower():
            return mod
    raise AttributeError("no rotary embedding module")
