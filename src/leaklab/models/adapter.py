"""Family adapters: what gradient attacks need from a transformer, discovered from the module tree.

Nothing here is keyed on a model name. The adapter finds the stack of blocks, each block's attention
projections (separate Q/K/V or fused QKV, ``nn.Linear`` or GPT-2's transposed ``Conv1D``), the token and
position embeddings, the first normalisation, and head counts, and it can capture the exact input of any
layer's attention projections with a forward pre-hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leaklab.errors import LeaklabError
from leaklab.models.device import chunk_rows

_Q_NAMES = ("q_proj", "query", "q_lin", "wq", "q")  # "q": MPNet's attention.attn.q
_K_NAMES = ("k_proj", "key", "k_lin", "wk", "k")
_V_NAMES = ("v_proj", "value", "v_lin", "wv", "v")
_FUSED_NAMES = ("c_attn", "qkv_proj", "Wqkv", "query_key_value", "qkv")
#: the MLP's input-side linear maps (what multiplies the post-attention hidden state)
_MLP_IN_NAMES = ("gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "dense_h_to_4h", "lin1")


@dataclass(frozen=True)
class Projection:
    """One of Q, K or V in one layer: the parameter holding it and the rows of the (out x in) matrix."""

    param: str
    rows: tuple[int, int]
    transposed: bool  # weight stored as (in, out), as in GPT-2's Conv1D

    def matrix(self, weight_or_grad: torch.Tensor) -> torch.Tensor:
        """The (out x in) block of this projection, from the full parameter or its gradient."""
        mat = weight_or_grad.t() if self.transposed else weight_or_grad
        return mat[self.rows[0] : self.rows[1]]


@dataclass(frozen=True)
class LayerProjections:
    layer: int
    q: Projection
    k: Projection
    v: Projection
    module: str  # name of the module whose input is the layer's attention input (q's module)

    def __iter__(self):
        return iter((("q", self.q), ("k", self.k), ("v", self.v)))


@dataclass(frozen=True)
class MlpInputs:
    """The input-side linear maps of one layer's MLP; all multiply the same post-attention hidden state."""

    layer: int
    projections: tuple[Projection, ...]
    module: str  # a module whose input is that hidden state


class _StopForward(Exception):
    pass


class FamilyAdapter:
    """Attack-facing view of a Hugging Face transformer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        cfg = model.config
        self.hidden_size: int = _cfg(cfg, "hidden_size", "n_embd", "d_model", "dim")
        self.num_heads: int = _cfg(cfg, "num_attention_heads", "n_head", "num_heads")
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads
        self.is_causal: bool = not getattr(cfg, "is_encoder_decoder", False) and _is_decoder(model)
        self.blocks_name, self.blocks = _find_blocks(model)
        self.num_layers = len(self.blocks)
        self.embeddings: nn.Embedding = model.get_input_embeddings()
        self.position_embeddings, self.position = _find_positions(model, self.embeddings)
        # RoBERTa, XLM-R and MPNet number positions from padding_idx + 1 (their position table has a padding row)
        pad_row = getattr(self.position_embeddings, "padding_idx", None)
        self.position_offset: int = pad_row + 1 if pad_row is not None else 0
        self.projections = [self._layer_projections(i) for i in range(self.num_layers)]
        self.first_norm = _first_norm(self.blocks[0], model)
        self.family = {"rope": "llama-like", "learned": "gpt2-like" if self.is_causal else "bert-like"}.get(
            self.position, "other"
        )

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live: attack tensors computed with the model go there too."""
        return self.embeddings.weight.device

    # ---------------------------------------------------------------- discovery
    def _layer_projections(self, layer: int) -> LayerProjections:
        block = self.blocks[layer]
        prefix = f"{self.blocks_name}.{layer}"
        found: dict[str, tuple[str, nn.Module]] = {}
        for name, mod in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if not hasattr(mod, "weight") or not isinstance(mod.weight, torch.Tensor) or mod.weight.dim() != 2:
                continue
            for key, names in (("q", _Q_NAMES), ("k", _K_NAMES), ("v", _V_NAMES), ("qkv", _FUSED_NAMES)):
                if leaf in names and key not in found:
                    found[key] = (f"{prefix}.{name}", mod)
        kv = self.num_kv_heads * self.head_dim
        if "qkv" in found:
            name, mod = found["qkv"]
            transposed = type(mod).__name__ == "Conv1D"
            q_out = self.num_heads * self.head_dim
            spans = ((0, q_out), (q_out, q_out + kv), (q_out + kv, q_out + 2 * kv))
            projs = [Projection(f"{name}.weight", s, transposed) for s in spans]
            return LayerProjections(layer, *projs, module=name)
        if not all(k in found for k in "qkv"):
            raise LeaklabError(
                f"cannot find attention projections in block {prefix} ({type(block).__name__}); found {sorted(found)}"
            )
        projs = []
        for key in "qkv":
            name, mod = found[key]
            transposed = type(mod).__name__ == "Conv1D"
            out = mod.weight.shape[1] if transposed else mod.weight.shape[0]
            projs.append(Projection(f"{name}.weight", (0, out), transposed))
        return LayerProjections(layer, *projs, module=found["q"][0])

    def mlp_inputs(self, layer: int) -> MlpInputs:
        """The MLP input projections of ``layer`` (Llama gate/up, GPT-2 c_fc, BERT intermediate.dense)."""
        block = self.blocks[layer]
        prefix = f"{self.blocks_name}.{layer}"
        found: list[tuple[str, nn.Module]] = []
        for name, mod in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            weight = getattr(mod, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            if leaf in _MLP_IN_NAMES or name.endswith("intermediate.dense"):
                found.append((f"{prefix}.{name}", mod))
        if not found:
            raise LeaklabError(f"cannot find the MLP input projection in block {prefix} ({type(block).__name__})")
        projs = []
        for name, mod in found:
            transposed = type(mod).__name__ == "Conv1D"
            out = mod.weight.shape[1] if transposed else mod.weight.shape[0]
            projs.append(Projection(f"{name}.weight", (0, out), transposed))
        return MlpInputs(layer, tuple(projs), module=found[0][0])

    # ---------------------------------------------------------------- capture
    def module_inputs(self, input_ids: torch.Tensor, modules: list[str], **model_kwargs) -> list[torch.Tensor]:
        """Inputs of ``modules`` (listed in forward order) in one forward pass that stops after the last."""
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def make_hook(i: int):
            def hook(_mod, args):
                captured[i] = args[0].detach()
                if i == len(modules) - 1:
                    raise _StopForward

            return hook

        for i, name in enumerate(modules):
            handles.append(self.model.get_submodule(name).register_forward_pre_hook(make_hook(i)))
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
        try:
            self.model(input_ids=input_ids.to(self.device), **kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(modules):
            missing = [m for i, m in enumerate(modules) if i not in captured]
            raise LeaklabError(f"the forward pass did not reach {missing}")
        return [captured[i] for i in range(len(modules))]

    @torch.no_grad()
    def layer_inputs(
        self,
        input_ids: torch.Tensor,
        layer: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Input X (batch, tokens, d) of layer ``layer``'s attention projections: what W_q multiplies.
        Extra ``model_kwargs`` (e.g. ``past_key_values``) go to the model's forward."""
        kwargs = dict(model_kwargs)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.module_inputs(input_ids, [self.projections[layer].module], **kwargs)[0]

    @torch.no_grad()
    def token_inputs(
        self, token_ids: torch.Tensor, position: int = 0, layer: int = 0, chunk: int | None = None
    ) -> torch.Tensor:
        """First-layer input of each token alone at ``position`` (rows of the returned (n, d) matrix), a chunk of
        tokens per forward pass (default: from the device's free memory, a few d-wide activations a token)."""
        chunk = chunk or chunk_rows(16 * 4 * self.hidden_size, self.device, most=8192)
        outs = []
        for start in range(0, len(token_ids), chunk):
            ids = token_ids[start : start + chunk].view(-1, 1)
            pos = torch.full_like(ids, position + self.position_offset)
            outs.append(self.layer_inputs(ids, layer, position_ids=pos)[:, 0, :])
        return torch.cat(outs)

    def describe(self) -> dict:
        return {
            "family": self.family,
            "causal": self.is_causal,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "positions": self.position,
            "vocab_size": self.embeddings.num_embeddings,
            "first_attention": {k: p.param for k, p in self.projections[0]},
        }


def _cfg(cfg, *names: str) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    raise LeaklabError(f"model config has none of {names}")


def _is_decoder(model: nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "is_decoder", False):
        return True
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    return (
        type(model).__name__.endswith("CausalLM")
        or "CausalLM" in archs
        or hasattr(model, "lm_head")
        or cfg.model_type in {"gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gptj", "opt", "phi", "falcon"}
    )


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        uniform = isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1
        if uniform and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise LeaklabError(f"no stack of transformer blocks found in {type(model).__name__}")
    return best


def _find_positions(
    model: nn.Module, tok: nn.Embedding
) -> tuple[nn.Embedding | None, Literal["rope", "learned", "none"]]:
    for name, mod in model.named_modules():
        is_pos = "position" in name or name.endswith("wpe")
        if isinstance(mod, nn.Embedding) and mod is not tok and is_pos:
            return mod, "learned"
    for name, mod in model.named_modules():
        if "rotary" in name.lower() or "rotary" in type(mod).__name__.lower():
            return None, "rope"
    return None, "none"


def _first_norm(block: nn.Module, model: nn.Module) -> nn.Module:
    """The normalisation whose output feeds the first attention: the block's own pre-norm, or, for
    post-norm encoders (BERT), the embedding LayerNorm."""
    for name, mod in block.named_children():
        if "norm" in type(mod).__name__.lower() or name.startswith("ln"):
            return mod
    for name, mod in model.named_modules():
        if "embeddings" in name and "norm" in type(mod).__name__.lower():
            return mod
    raise LeaklabError(f"no first normalisation found in {type(block).__name__}")
