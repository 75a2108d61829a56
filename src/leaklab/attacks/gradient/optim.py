"""Optimisation baselines: TAG (Deng et al., EMNLP Findings 2021) and LAMP (Balunović et al., NeurIPS 2022).

Both written from the papers' descriptions, for next-token models:

* **TAG** optimises dummy input embeddings x (B × L × d) so that the gradient they cause matches the observed
  one, under D = ‖g(x) − g‖₂² / ‖g‖₂² + α ‖g(x) − g‖₁ / ‖g‖₁ over every shared tensor (the papers' L2 + α·L1
  distance, each term divided by the observed update's own norm so the weights do not depend on its scale).
  The next-token targets are the tokens x currently projects to (nearest by cosine, held fixed within a step).
  Tokens are read out by the same projection.
* **LAMP** is TAG plus a language-model prior and discrete moves: every ``every`` continuous steps, candidate
  moves of one sequence's embedding rows (swap two rows, move a row, insert a pool token and drop the last) are
  scored by D + λ · log-perplexity of the projected tokens under the attacked model itself (the model is public
  to the server), and the best candidate, if better than the current rows, replaces them.

What they need beyond the update is taken from the Observation, or estimated and recorded in ``info["grants"]``:
the batch size (required: TAG/LAMP cannot run without it), the lengths (granted, or estimated as the size of
the leaked token set over B), the vocabulary the embeddings project onto (the token set leaked by the
embedding gradient when it is shared, else the whole vocabulary).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from leaklab.attacks.base import CannotRun, NoSignal, Recovery, register_gradient_attack
from leaklab.attacks.gradient.dropout import DropoutSites, RelaxedMasks, dropout_forward
from leaklab.core import Config, option
from leaklab.errors import UnknownNameError
from leaklab.models.registry import LoadedModel, load_model
from leaklab.threat.observation import Observation

VOCABS = ("tokenset", "full")
IGNORE = -100


@dataclass(frozen=True)
class TagOptions(Config):
    """TAG's options (``-o key=value``)."""

    steps: int = option(200, "continuous optimisation steps (Adam on the dummy embeddings)")
    lr: float = option(0.1, "Adam learning rate, in units of the vocabulary's row std")
    alpha: float = option(0.01, "weight of the L1 term of the gradient distance")
    vocab: str = option("tokenset", "tokens the embeddings project onto: tokenset (leaked rows, if shared) or full")
    init_std: float = option(1.0, "std of the random initial embeddings, in units of the vocabulary's row std")
    seed: int = option(0, "seed of the initial embeddings")
    budget_s: float = option(0.0, "stop optimising after this many seconds (0: no limit)")
    learn_dropout: bool = option(
        False, "GRAB: when the update was computed with dropout on, learn relaxed dropout masks alongside"
    )
    mask_lr: float = option(0.1, "Adam learning rate of the dropout masks' logits (with learn_dropout)")

    def __post_init__(self) -> None:
        if self.vocab not in VOCABS:
            raise UnknownNameError("vocab", self.vocab, list(VOCABS))
        self.require(positive=("steps", "lr", "init_std", "mask_lr"), non_negative=("alpha", "budget_s"))


@dataclass(frozen=True)
class LampOptions(TagOptions):
    """LAMP's options: TAG's plus the prior's weight and the discrete moves."""

    lm_weight: float = option(0.2, "λ: weight of the log-perplexity prior in the discrete moves' score")
    every: int = option(25, "continuous steps between discrete move rounds")
    candidates: int = option(16, "moves scored per round (sampled from all swaps, moves and inserts)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(positive=("every", "candidates"), non_negative=("lm_weight",))


# ----------------------------------------------------------------------------- the gradient distance
def gradient_distance(
    grads: list[torch.Tensor], observed: list[torch.Tensor], alpha: float, norms: tuple[float, float]
) -> torch.Tensor:
    """‖g' − g‖₂² / n₂ + α ‖g' − g‖₁ / n₁ over all tensors; ``norms`` = (n₂, n₁) = (‖g‖₂², ‖g‖₁)."""
    l2 = sum((a - b).pow(2).sum() for a, b in zip(grads, observed, strict=True))
    l1 = sum((a - b).abs().sum() for a, b in zip(grads, observed, strict=True))
    return l2 / norms[0] + alpha * l1 / norms[1]


class Matcher:
    """The attacked model, the shared tensors it can reproduce, and D for dummy embeddings."""

    def __init__(self, loaded: LoadedModel, obs: Observation, alpha: float) -> None:
        self.model = loaded.model
        named = dict(self.model.named_parameters())
        self.names = [n for n in obs.gradients if n in named]
        if not self.names:
            raise CannotRun("the update shares no tensor of the model's parameters: nothing to match")
        self.params = [named[n] for n in self.names]
        self.observed = [obs.gradients[n].to(loaded.device, torch.float32) for n in self.names]
        n2 = float(sum(g.double().pow(2).sum() for g in self.observed))
        n1 = float(sum(g.double().abs().sum() for g in self.observed))
        self.norms = (max(n2, 1e-300), max(n1, 1e-300))
        self.alpha = alpha
        emb = loaded.adapter.embeddings
        self.table = next((i for i, p in enumerate(self.params) if p is emb.weight), None)
        self.padding_idx = getattr(emb, "padding_idx", None)  # its row never receives a gradient
        self.relax: DropoutSites | None = None  # dropout masks (GRAB: learned), applied in every forward

    def distance(self, x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """D of the gradient that embeddings ``x`` with next-token ``labels`` (pads −100) cause. The embedding
        table's gradient gets the input path too: ∂L/∂x_t is added to the row of the token x_t projects to
        (``labels`` holds those tokens; not the padding row), as the victim's input ids add it to their rows."""
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
            with self.relax or nullcontext():
                loss = self.model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
            *grads, gx = torch.autograd.grad(loss, [*self.params, x], create_graph=create_graph)
        if self.table is not None:
            keep = mask.bool() if self.padding_idx is None else mask.bool() & (labels != self.padding_idx)
            grads[self.table] = grads[self.table].index_add(0, labels[keep], gx[keep])
        return gradient_distance(grads, self.observed, self.alpha, self.norms)


# ----------------------------------------------------------------------------- what the attack knows
@dataclass
class Setup:
    """The dummy batch's shape, the vocabulary it projects onto, and how each was obtained."""

    batch_size: int
    lengths: list[int]
    pool: torch.Tensor  # token ids the embeddings project onto
    grants: dict[str, str]


def leaked_pool(obs: Observation, loaded: LoadedModel) -> torch.Tensor | None:
    """The token set leaked by the embedding gradient (None when the update has none)."""
    from leaklab.attacks.gradient.tokenleak import leaked_tokens
    from leaklab.attacks.gradient.tokenset import leaked_token_ids

    emb = loaded.adapter.embeddings.weight
    if not any(p is emb for n, p in loaded.model.named_parameters() if n in obs.gradients):
        return None
    head = loaded.model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    ids = leaked_tokens(obs) if tied else leaked_token_ids(obs)
    return torch.tensor(sorted(ids), dtype=torch.long) if ids else None


def setup(obs: Observation, loaded: LoadedModel, vocab: str) -> Setup:
    """Batch size (required), lengths (granted or estimated) and the projection vocabulary, with the grants."""
    if obs.model.task != "next-token":
        raise CannotRun(f"TAG/LAMP here match next-token updates; the model's task is '{obs.model.task}'")
    if obs.batch_size is None:
        raise CannotRun("the batch size is not granted (flags.batch_size_known): the dummy batch has no shape")
    b = obs.batch_size
    grants = {"batch_size": "granted"}
    pool = leaked_pool(obs, loaded) if vocab == "tokenset" else None
    if pool is not None:
        grants["vocabulary"] = f"token set leaked by the embedding gradient ({pool.numel()} tokens)"
    else:
        pool = torch.arange(loaded.adapter.embeddings.weight.shape[0])
        grants["vocabulary"] = "full vocabulary"
    if obs.lengths is not None:
        lengths = list(obs.lengths)
        grants["lengths"] = "granted"
    elif grants["vocabulary"] != "full vocabulary":
        lengths = [max(2, math.ceil(pool.numel() / b))] * b
        grants["lengths"] = "estimated: leaked token set size / B, for every text"
    else:
        raise CannotRun("neither the lengths nor an embedding gradient (token-set estimate) is available")
    return Setup(b, lengths, pool, grants)


# ----------------------------------------------------------------------------- continuous part (TAG)
class Dummy:
    """Dummy embeddings (B × L × d) with the mask of the granted/estimated lengths and the readout."""

    def __init__(self, loaded: LoadedModel, s: Setup, init_std: float, seed: int) -> None:
        emb = loaded.adapter.embeddings.weight.detach()
        self.table = emb[s.pool.to(emb.device)]
        self.unit = torch.nn.functional.normalize(self.table, dim=1)
        self.pool = s.pool
        width = max(s.lengths)
        self.mask = torch.zeros(s.batch_size, width, dtype=torch.long, device=emb.device)
        for i, n in enumerate(s.lengths):
            self.mask[i, :n] = 1
        gen = torch.Generator().manual_seed(seed)
        scale = float(self.table.std()) * init_std
        mean = self.table.mean(0)
        x = mean + scale * torch.randn(s.batch_size, width, emb.shape[1], generator=gen).to(emb.device)
        self.x = x.requires_grad_(True)
        self.scale = float(self.table.std())

    def indices(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Index into the pool of the nearest row (cosine) per position."""
        x = self.x if x is None else x
        return (torch.nn.functional.normalize(x.detach(), dim=-1) @ self.unit.T).argmax(-1)

    def tokens(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool.to(self.mask.device)[self.indices(x)]

    def labels(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokens(x).masked_fill(self.mask == 0, IGNORE)

    def texts(self, loaded: LoadedModel) -> tuple[list[str], list[list[int]]]:
        ids = [row[: int(m.sum())].tolist() for row, m in zip(self.tokens(), self.mask, strict=True)]
        return [loaded.decode(t) for t in ids], ids


def tag_steps(matcher: Matcher, dummy: Dummy, opt: torch.optim.Optimizer, steps: int, deadline: float) -> int:
    """Up to ``steps`` Adam steps on D (stops at ``deadline``, a perf_counter time), then the iterate with the
    lowest D is kept (D jumps whenever a position's nearest token changes); returns the steps taken. With
    learned dropout masks, their logits are optimised and kept alongside."""
    variables = [dummy.x, *mask_logits(matcher)]
    best, best_state, done = math.inf, [v.detach().clone() for v in variables], 0
    while done < steps and time.perf_counter() <= deadline:
        done += 1
        dist = matcher.distance(dummy.x, dummy.labels(), dummy.mask, create_graph=True)
        if (value := float(dist.detach())) < best:
            best, best_state = value, [v.detach().clone() for v in variables]
        grads = torch.autograd.grad(dist, variables)
        opt.zero_grad(set_to_none=True)
        for v, g in zip(variables, grads, strict=True):
            v.grad = g
        opt.step()
    if float(matcher.distance(dummy.x.detach(), dummy.labels(), dummy.mask, False)) > best:
        with torch.no_grad():
            for v, kept in zip(variables, best_state, strict=True):
                v.copy_(kept)
    return done


def mask_logits(matcher: Matcher) -> list[torch.Tensor]:
    """The learned dropout masks' logits (none without ``learn_dropout``)."""
    return matcher.relax.logits if isinstance(matcher.relax, RelaxedMasks) else []


def adam(matcher: Matcher, dummy: Dummy, lr: float, mask_lr: float) -> torch.optim.Adam:
    """Adam on the dummy embeddings (lr in units of the vocabulary's row std) and the masks' logits."""
    groups: list[dict[str, Any]] = [{"params": [dummy.x], "lr": lr * dummy.scale}]
    if mask_logits(matcher):
        groups.append({"params": mask_logits(matcher), "lr": mask_lr})
    return torch.optim.Adam(groups)


def learn_dropout(matcher: Matcher, dummy: Dummy, obs: Observation, stack: ExitStack) -> dict[str, Any]:
    """Set up GRAB's relaxed masks when the update was computed with dropout on and the model's forward has
    active dropout calls (found by one forward); the model stays in train mode with eager attention until
    ``stack`` closes. Returns what was done, for ``info``."""
    if not obs.flags.train_mode:
        return {"learned": False, "why": "the update was computed with dropout off (flags.train_mode)"}
    stack.enter_context(dropout_forward(matcher.model))
    matcher.relax = RelaxedMasks()
    matcher.distance(dummy.x.detach(), dummy.labels(), dummy.mask, create_graph=False)  # creates the sites
    if not matcher.relax.logits:
        matcher.relax = None
        return {"learned": False, "why": "the model's forward has no active dropout call (p = 0 everywhere)"}
    return {"learned": True, "p": "from the model's config (public)", "masks": "learned, not granted"}


# ----------------------------------------------------------------------------- discrete part (LAMP)
Move = tuple[str, int, int, int]  # (kind, sequence, i, j): swap rows i, j / move row i to j / insert pool[i] at j


def all_moves(lengths: list[int], pool_size: int) -> Iterator[Move]:
    """Every swap (i < j), move (i → j, i ≠ j) and insert (pool token at j, last row dropped) of each sequence."""
    for s, n in enumerate(lengths):
        for i in range(n):
            for j in range(n):
                if i < j:
                    yield ("swap", s, i, j)
                if i != j:
                    yield ("move", s, i, j)
        for v in range(pool_size):
            for j in range(n):
                yield ("insert", s, v, j)


def apply_move(x: torch.Tensor, move: Move, length: int, table: torch.Tensor) -> torch.Tensor:
    """A copy of the batch's rows ``x`` (B × L × d) with ``move`` applied within the first ``length`` rows."""
    kind, s, i, j = move
    out = x.clone()
    rows = list(x[s, :length])
    if kind == "swap":
        rows[i], rows[j] = rows[j], rows[i]
    elif kind == "move":
        rows.insert(j, rows.pop(i))
    else:
        rows = [*rows[:j], table[i], *rows[j:]][:length]
    out[s, :length] = torch.stack(rows)
    return out


def best_move(
    x: torch.Tensor, moves: list[Move], lengths: list[int], table: torch.Tensor, score: Callable[[torch.Tensor], float]
) -> tuple[torch.Tensor, float, Move | None]:
    """The lowest-scoring of the current rows and each move's result (ties keep the earlier one)."""
    best_x, best, chosen = x, score(x), None
    for move in moves:
        cand = apply_move(x, move, lengths[move[1]], table)
        value = score(cand)
        if value < best:
            best_x, best, chosen = cand, value, move
    return best_x, best, chosen


def sample_moves(lengths: list[int], pool_size: int, k: int, rng: random.Random) -> list[Move]:
    """``k`` moves drawn uniformly: a kind, a sequence, then positions (no enumeration of all moves)."""
    out: list[Move] = []
    while len(out) < k:
        s = rng.randrange(len(lengths))
        n = lengths[s]
        kind = rng.choice(("swap", "move", "insert"))
        j = rng.randrange(n)
        if kind == "insert":
            out.append((kind, s, rng.randrange(pool_size), j))
        elif n > 1:
            i = rng.choice([p for p in range(n) if p != j])
            out.append((kind, s, min(i, j), max(i, j)) if kind == "swap" else (kind, s, i, j))
    return out


class LampScore:
    """D of the rows (no double backward) + λ · mean next-token NLL of their projected tokens."""

    def __init__(self, matcher: Matcher, dummy: Dummy, lm_weight: float) -> None:
        self.matcher, self.dummy, self.lm_weight = matcher, dummy, lm_weight

    def __call__(self, x: torch.Tensor) -> float:
        labels = self.dummy.labels(x)
        dist = float(self.matcher.distance(x.detach(), labels, self.dummy.mask, create_graph=False))
        if self.lm_weight == 0:
            return dist
        with torch.no_grad():
            ids = self.dummy.tokens(x)
            nll = float(self.matcher.model(input_ids=ids, attention_mask=self.dummy.mask, labels=labels).loss)
        return dist + self.lm_weight * nll


# ----------------------------------------------------------------------------- the attacks
class OptimAttack:
    """Shared run(): setup, optimisation within the budget, readout."""

    name = ""
    options: type[Config] = TagOptions

    def __init__(self, opts: Config | None = None) -> None:
        self.opts = opts or self.options()

    def run(self, obs: Observation) -> Recovery:
        o = self.opts
        loaded = load_model(obs.model)
        s = setup(obs, loaded, o.vocab)
        matcher = Matcher(loaded, obs, o.alpha)
        if not any(bool(g.any()) for g in matcher.observed):
            raise NoSignal("every shared tensor TAG/LAMP can reproduce is zero")
        dummy = Dummy(loaded, s, o.init_std, o.seed)
        deadline = time.perf_counter() + o.budget_s if o.budget_s > 0 else math.inf
        info: dict[str, Any] = {"grants": s.grants, "lengths": s.lengths}
        with ExitStack() as stack:
            if o.learn_dropout:
                info["dropout_masks"] = learn_dropout(matcher, dummy, obs, stack)
            info |= self.optimise(matcher, dummy, s, deadline)
            info["final_distance"] = float(matcher.distance(dummy.x.detach(), dummy.labels(), dummy.mask, False))
            if isinstance(matcher.relax, RelaxedMasks):
                info["dropout_masks"] |= matcher.relax.summary()
        texts, ids = dummy.texts(loaded)
        return Recovery(texts, ids, info=info)

    def optimise(self, matcher: Matcher, dummy: Dummy, s: Setup, deadline: float) -> dict[str, Any]:
        opt = adam(matcher, dummy, self.opts.lr, self.opts.mask_lr)
        return {"steps": tag_steps(matcher, dummy, opt, self.opts.steps, deadline)}


@register_gradient_attack("tag", TagOptions, settings=("fedsgd",), help="TAG: L2+L1 gradient matching on embeddings")
class TagAttack(OptimAttack):
    """TAG: continuous gradient matching on dummy embeddings, read out by the nearest token."""

    name, options = "tag", TagOptions


@register_gradient_attack("lamp", LampOptions, settings=("fedsgd",), help="LAMP: TAG + LM prior + discrete moves")
class LampAttack(OptimAttack):
    """LAMP: TAG's continuous steps alternated with discrete moves scored by D + λ · log-perplexity."""

    name, options = "lamp", LampOptions

    def optimise(self, matcher: Matcher, dummy: Dummy, s: Setup, deadline: float) -> dict[str, Any]:
        o = self.opts
        opt = adam(matcher, dummy, o.lr, o.mask_lr)
        score = LampScore(matcher, dummy, o.lm_weight)
        rng = random.Random(o.seed)
        steps, accepted, rounds = 0, 0, 0
        while steps < o.steps and time.perf_counter() < deadline:
            steps += tag_steps(matcher, dummy, opt, min(o.every, o.steps - steps), deadline)
            if time.perf_counter() >= deadline:
                break
            moves = sample_moves(s.lengths, dummy.table.shape[0], o.candidates, rng)
            new, _, chosen = best_move(dummy.x.detach(), moves, s.lengths, dummy.table, score)
            rounds += 1
            if chosen is not None:
                accepted += 1
                with torch.no_grad():
                    dummy.x.copy_(new)
                opt = adam(matcher, dummy, o.lr, o.mask_lr)  # the moments belong to the old rows
        return {"steps": steps, "move_rounds": rounds, "moves_accepted": accepted}
