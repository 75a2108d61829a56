"""Sentence-level evidence in a LoRA update's adapter space (after UTR, arXiv 2601.17533, adapted to LoRA).

A LoRA update at the seeded init (B = 0) shares only ∂L/∂B = s·Σ_t δ_t (A x_t)ᵀ for every adapted projection of
every layer; its rows lie in R^r, so at r = 8 the span checks of SOMP and DAGER are saturated (no signal). The
update is still a sum over the batch's texts, and over each text's loss terms: in a causal LM the terms of
positions < k depend only on the text's first k tokens, so the adapter gradient of a prefix's summed loss (the
text cut after its k-th token) is an exact additive part of the text's, and so of the batch's, adapter gradient.
Texts are decoded one token at a time: each candidate continuation (the public LM's top guesses, or a granted
token set ordered by them) is scored by how much its prefix's exact adapter gradient lowers the residual of the
observed update after least squares on it and the texts already decoded (free scales: the 1/N of the mean loss is
not observed). A small beam of prefixes grows; a text ends when the best prefix has not improved for a few steps.
Texts are decoded one after another, each fitted beside the ones before (OMP-style), then each is decoded again
with all the others fixed.

UTR's own token-presence step reads a dense adapter with a bias on the embedding output (weight-gradient rows over
bias-gradient entries are input embeddings); LoRA has neither, so no token set is read here: it is either
granted (an explicit extra-knowledge flag, recorded) or left to the LM's guesses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leaklab.attacks.base import CannotRun, NoSignal, Recovery, register_gradient_attack
from leaklab.core import Config, option
from leaklab.models.registry import load_model
from leaklab.threat.observation import Observation

LORA_B = ".lora_B.default"
#: the Observation meta key of a token set granted as extra knowledge (recorded with the observation)
GRANTED_TOKEN_SET = "granted_token_set"


def adapter_modules(model: nn.Module, names: list[str] | None = None) -> dict[str, nn.Module]:
    """The LoRA B linears of a peft model by the name of their weight (``…lora_B.default.weight``), in ``names``'
    order when given (the observed update's keys), else in module order."""
    found = {f"{n}.weight": m for n, m in model.named_modules() if n.endswith(LORA_B)}
    if names is None:
        return found
    return {n: found[n] for n in names if n in found}


def prefix_adapter_gradients(
    model: nn.Module, modules: dict[str, nn.Module], rows: list[list[int]], pad: int = 0
) -> torch.Tensor:
    """(len(rows), D) float64: per row, ∂/∂B of the row's summed next-token loss (every position a target but
    the first) for each module, flattened and concatenated in ``modules``' order. One batched backward: rows are
    right-padded and masked, so they do not interact; each row's ∂/∂B is Σ_t δ_t aᵀ_t over its own positions
    (a = A x the B linear's input, δ the gradient at its output)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m, args, out):
            inputs[name] = args[0].detach()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    finally:
        for h in handles:
            h.remove()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    names = list(modules)
    deltas = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
    keep_rows = mask.unsqueeze(-1).float()
    parts = []
    for n, d in zip(names, deltas, strict=True):
        if d is None:  # a module the loss does not reach (cannot happen for attention projections)
            d = torch.zeros_like(outputs[n])  # noqa: PLW2901
        parts.append(torch.einsum("bto,btr->bor", d.float() * keep_rows, inputs[n].float()).flatten(1))
    return torch.cat(parts, dim=1).double().cpu()


def module_weights(y: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per coordinate 1/‖y_m‖ of its module's block m of the observed update: every adapted module weighs the
    same in the residual (unweighted, a few modules' large blocks decide every fit)."""
    out, start = [], 0
    for n in sizes:
        out.append(torch.full((n,), 1.0 / max(float(y[start : start + n].norm()), 1e-300), dtype=y.dtype))
        start += n
    return torch.cat(out)


class Residual:
    """Least-squares residual of an observed vector y after fitting it on fixed columns F and one candidate g."""

    def __init__(self, y: torch.Tensor, fixed: list[torch.Tensor]) -> None:
        self.norm2 = float(y @ y)
        if fixed:
            q, _ = torch.linalg.qr(torch.stack(fixed, dim=1))
            self.q = q
            self.y = y - q @ (q.T @ y)
        else:
            self.q = None
            self.y = y

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """(n,) relative residual ‖y − fit‖/‖y‖ for each row of g (n, D) added to the fixed columns."""
        if self.q is not None:
            g = g - (g @ self.q) @ self.q.T
        proj = (g @ self.y) ** 2 / (g * g).sum(1).clamp_min(1e-300)
        return ((float(self.y @ self.y) - proj).clamp_min(0.0) / max(self.norm2, 1e-300)).sqrt()

    def base(self) -> float:
        """The relative residual with the fixed columns alone."""
        return (float(self.y @ self.y) / max(self.norm2, 1e-300)) ** 0.5


@dataclass(frozen=True)
class UtrOptions(Config):
    """UTR-style sentence decoding in LoRA adapter space (``-o key=value``)."""

    width: int = option(24, "candidate next tokens per step (the public LM's top guesses, within the token set)")
    first_width: int = option(16, "first tokens per text considered for the starts (the LM's guesses)")
    starts: int = option(4, "likeliest two-token starts under the LM grown per text")
    max_len: int = option(40, "longest text decoded, in tokens")
    passes: int = option(1, "passes editing each text again with all the others fixed (after the first decode)")
    grant_token_set: bool = option(
        False, "extra knowledge, recorded: the batch's token set is granted (LoRA shares no token-presence signal)"
    )
    filter_width: int = option(
        0, "extra candidates per step from a whole-vocabulary matched filter of the residual (no granted set)"
    )
    beam: int = option(2, "prefixes kept per step")
    patience: int = option(2, "steps without a better prefix before a text ends")
    edit_rounds: int = option(12, "rounds of residual-verified single-token edits of each decoded text; 0 = off")
    edit_width: int = option(6, "tokens tried per position by the edits (the LM's guesses, within the set)")
    weigh_modules: bool = option(True, "weigh every adapted module's block equally in the residual")
    min_gain: float = option(1e-3, "a text ends when its best continuation lowers the relative residual less")
    chunk: int = option(64, "candidate rows per backward pass")
    budget_s: float = option(1800.0, "time limit, seconds (decoding stops, texts so far are kept)")

    def __post_init__(self) -> None:
        self.require(
            positive=(
                "width",
                "first_width",
                "starts",
                "edit_width",
                "max_len",
                "chunk",
                "budget_s",
                "beam",
                "patience",
            ),
            non_negative=("passes", "filter_width", "edit_rounds"),
        )


#: the matched filter's step: the largest entry of ε·v, a B entry's size after a few SGD steps
FILTER_STEP = 1e-2


class Decoder:
    """Greedy decoding of texts whose prefix adapter gradients explain an observed LoRA update."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        y: torch.Tensor,
        sizes: dict[str, int],
        opts: UtrOptions,
        allowed: list[int] | None,
    ) -> None:
        self.model, self.opts = model, opts
        self.modules = adapter_modules(model, list(sizes))
        self.w = module_weights(y, list(sizes.values())) if opts.weigh_modules else torch.ones_like(y)
        self.y = y * self.w
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        start = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.start = (
            start
            if isinstance(start, int) and start != tokenizer.unk_token_id
            else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0))
        )
        self.allowed = torch.tensor(allowed) if allowed is not None else None
        self.deadline = time.monotonic() + opts.budget_s
        self.backward_rows = 0

    def gradients(self, rows: list[list[int]]) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), self.opts.chunk):
            out.append(prefix_adapter_gradients(self.model, self.modules, rows[i : i + self.opts.chunk], self.pad))
        self.backward_rows += len(rows)
        return torch.cat(out) * self.w

    @torch.no_grad()
    def ranked(self, prefix: list[int], k: int) -> tuple[list[int], list[float]]:
        """The LM's ``k`` likeliest next tokens after ``prefix`` (its document start when empty), within the
        granted token set if any, and their log-probabilities."""
        ids = torch.tensor([[self.start, *prefix]], device=next(self.model.parameters()).device)
        logp = torch.log_softmax(self.model(input_ids=ids).logits[0, -1].float().cpu(), -1)
        pool = self.allowed if self.allowed is not None else torch.arange(logp.shape[0])
        order = pool[torch.argsort(logp[pool], descending=True)][:k]
        return order.tolist(), logp[order].tolist()

    def guesses(self, prefix: list[int], k: int) -> list[int]:
        return self.ranked(prefix, k)[0]

    def starts(self) -> list[list[int]]:
        """The ``starts`` likeliest first two tokens under the LM (within the granted set if any): a prefix's
        adapter gradient tells little until its later loss terms are there (a true text's first tokens leave a
        residual near 1), so texts start where the LM does and the residual decides between whole texts."""
        pairs = []
        firsts, lp1 = self.ranked([], self.opts.first_width)
        for a, la in zip(firsts, lp1, strict=True):
            seconds, lp2 = self.ranked([a], self.opts.width)
            pairs += [(la + lb, [a, b]) for b, lb in zip(seconds, lp2, strict=True)]
        pairs.sort(key=lambda x: -x[0])
        return [p for _, p in pairs[: self.opts.starts]]

    def candidates(self, prefix: list[int], fit: Residual) -> list[int]:
        """The LM's guesses after ``prefix``, plus (``filter_width``, no granted set) the matched filter's."""
        out = self.guesses(prefix, self.opts.width)
        if self.opts.filter_width and self.allowed is None:
            out += [c for c in self.filtered(prefix, fit) if c not in out]
        return out

    @torch.no_grad()
    def filtered(self, prefix: list[int], fit: Residual) -> list[int]:
        """The ``filter_width`` tokens whose next-token loss term at the end of ``prefix`` best matches the
        residual: a candidate c adds −∂z_c/∂B (plus a part common to all) to the prefix's gradient, so its inner
        product with the residual direction v (raw adapter coordinates of the weighted residual) is −∂z_c/∂B·v
        up to a constant, read for the whole vocabulary from two forward passes with B = ±ε·v (central finite
        difference; B = 0 restored after)."""
        v = self.w * fit.y
        eps = FILTER_STEP / max(float(v.abs().max()), 1e-300)
        ids = torch.tensor([prefix], device=next(self.model.parameters()).device)
        change = self._logits_at(ids, eps * v) - self._logits_at(ids, -eps * v)
        return torch.topk(-change, self.opts.filter_width).indices.tolist()

    def _logits_at(self, ids: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Last-position logits with the B weights set to the blocks of ``b`` (zeros again afterwards)."""
        weights = [m.weight for m in self.modules.values()]
        try:
            start = 0
            for wt in weights:
                wt.copy_(b[start : start + wt.numel()].view_as(wt).to(wt.dtype))
                start += wt.numel()
            return self.model(input_ids=ids).logits[0, -1].double().cpu()
        finally:
            for wt in weights:
                wt.zero_()

    def decode(self, fixed: list[torch.Tensor]) -> tuple[list[int], torch.Tensor, float]:
        """One text beside the ``fixed`` texts' gradients: its tokens, its gradient and the residual. From each
        of the LM's likeliest starts (:meth:`starts`) a beam of prefixes grows one token per step by the
        residual; the text leaving the smallest residual over all starts is kept."""
        fit = Residual(self.y, fixed)
        best = None
        for start in self.starts():
            if time.monotonic() >= self.deadline and best is not None:
                break
            grown = self.grow(start, fit)
            if best is None or grown[2] < best[2]:
                best = grown
        return best

    def grow(self, start: list[int], fit: Residual) -> tuple[list[int], torch.Tensor, float]:
        """The best prefix seen while a beam grows from ``start``; it stops when that prefix has not improved by
        ``min_gain`` for ``patience`` steps (a true continuation can fail to lower the residual for a step)."""
        beam = self._keep([start], fit)
        best, stale = beam[0], 0
        while len(beam[0][0]) < self.opts.max_len and stale < self.opts.patience and time.monotonic() < self.deadline:
            rows = [[*t, c] for t, _, _ in beam for c in self.candidates(t, fit)]
            beam = self._keep(rows, fit)
            if best[2] - beam[0][2] >= self.opts.min_gain:
                best, stale = beam[0], 0
            else:
                stale += 1
                if beam[0][2] < best[2]:
                    best = beam[0]
        return best

    def edit(self, text: list[int], fixed: list[torch.Tensor]) -> tuple[list[int], torch.Tensor, float]:
        """Residual-verified single-token edits of a whole decoded text (delete a token; insert or substitute
        one of the LM's ``edit_width`` guesses at a position, ``first_width`` at the first: the LM guesses a
        text's first token worst): the best edit is kept while it lowers the residual by ``min_gain``, for at
        most ``edit_rounds`` rounds. A whole text's evidence is far sharper than a prefix's (the true text
        leaves no residual), so a skipped or wrong token is put right here."""
        fit = Residual(self.y, fixed)
        best = self._keep([text], fit)[0]
        for _ in range(self.opts.edit_rounds):
            if time.monotonic() >= self.deadline:
                break
            t = best[0]
            rows = [t[:j] + t[j + 1 :] for j in range(len(t))] if len(t) > 2 else []
            for j in range(len(t) + 1):
                for c in self.guesses(t[:j], self.opts.edit_width if j else self.opts.first_width):
                    rows.append([*t[:j], c, *t[j:]])
                    if j < len(t) and c != t[j]:
                        rows.append([*t[:j], c, *t[j + 1 :]])
            top = self._keep(rows, fit)[0]
            if best[2] - top[2] < self.opts.min_gain:
                break
            best = top
        return best

    def _keep(self, rows: list[list[int]], fit: Residual) -> list[tuple[list[int], torch.Tensor, float]]:
        """The ``beam`` rows leaving the smallest residual: (tokens, weighted gradient, residual)."""
        grads = self.gradients(rows)
        res = fit(grads)
        order = torch.argsort(res)[: self.opts.beam].tolist()
        return [(rows[i], grads[i], float(res[i])) for i in order]

    def run(self, n: int) -> tuple[list[list[int]], float]:
        """``n`` texts, decoded (and edited) one after another, then edited ``passes`` times with the others
        fixed."""
        texts: list[list[int]] = []
        grads: list[torch.Tensor] = []
        res = 1.0
        for _ in range(n):
            if time.monotonic() >= self.deadline:
                break
            t, g, res = self.decode(grads)
            if self.opts.edit_rounds:
                t, g, res = self.edit(t, grads)
            texts.append(t)
            grads.append(g)
        for _ in range(self.opts.passes):
            for i in range(len(texts)):
                if time.monotonic() >= self.deadline:
                    return texts, res
                t, g, r = self.edit(texts[i], grads[:i] + grads[i + 1 :])
                if r < res:
                    texts[i], grads[i], res = t, g, r
        return texts, res


def observed_vector(obs: Observation, names: list[str]) -> torch.Tensor:
    """The observed ∂L/∂B tensors flattened in ``names``' order (float64)."""
    return torch.cat([obs.gradients[n].double().flatten() for n in names])


@register_gradient_attack(
    "utr",
    UtrOptions,
    settings=("lora",),
    help="LoRA (experimental): beam decoding by prefix adapter-gradient residuals under the LM prior (UTR-style)",
)
class UtrAttack:
    """Decodes the texts behind a LoRA update at its seeded init from the update's adapter gradients alone."""

    name = "utr"
    #: the attack reads the LoRA update itself, not the span view of it (which is saturated at small r)
    raw_update = True

    def __init__(self, opts: UtrOptions | None = None) -> None:
        self.opts = opts or UtrOptions()

    def run(self, obs: Observation) -> Recovery:
        from leaklab.threat.lora import lora_model

        meta = obs.meta.get("lora")
        if obs.setting != "lora" or not meta:
            raise CannotRun("utr reads a LoRA update (adapter gradients with their LoRA meta)")
        if meta.get("adapter_weights") or obs.flags.learning_rate is not None:
            raise CannotRun(
                "utr reads a first-round adapter gradient (B = 0, no learning rate); got a later round or a delta"
            )
        if obs.model.task != "next-token":
            raise CannotRun("utr decodes next-token updates")
        if obs.batch_size is None:
            raise CannotRun("utr needs the batch size (flag batch_size_known)")
        token_set = obs.meta.get(GRANTED_TOKEN_SET)
        if self.opts.grant_token_set and not token_set:
            raise CannotRun(
                f"grant_token_set is on but the observation grants no token set (meta '{GRANTED_TOKEN_SET}')"
            )
        model = lora_model(obs.model, meta)
        names = [n for n in obs.gradients if n.endswith(f"{LORA_B}.weight")]
        if not names:
            raise CannotRun("the LoRA update has no lora_B gradients")
        y = observed_vector(obs, names)
        if not bool(y.any()):
            raise NoSignal("the adapter gradients are all zeros")
        loaded = load_model(obs.model)
        allowed = sorted(set(token_set)) if self.opts.grant_token_set and token_set is not None else None
        sizes = {n: obs.gradients[n].numel() for n in names}
        dec = Decoder(model, loaded.tokenizer, y, sizes, self.opts, allowed)
        with torch.enable_grad():
            texts, residual = dec.run(int(obs.batch_size))
        if residual > 0.999:
            raise NoSignal(f"no decoded text lowers the adapter update's residual (relative residual {residual:.4f})")
        info = {
            "residual": residual,
            "backward_rows": dec.backward_rows,
            "grants": {"token_set": allowed is not None, "batch_size": True},
            "modules": len(names),
        }
        return Recovery([loaded.decode(t) for t in texts], texts, info=info)
