"""What a LoRA client update (adapter tensors only) carries, outside Flower: one client of smollm2-135m, 4 short texts.

``spectrum``: per span layer and adapted projection, the singular values of the pseudo-gradient
G' = ∂L/∂B·(AAᵀ)⁻¹A around the batch's rank, with the rank read from the whole spectrum (the old test) and from its
r leading values (:func:`leaklab.attacks.gradient.views.adapter_rank`).
``final-token``: whether the update tells each text's final token (a prediction target only, which the span attacks
read from the output-embedding gradient LoRA does not share): for each text, the relative residual between the
observed layer-0/1 V pseudo-gradients and those of the batch with that text's final token replaced by each of the
public LM's top guesses.

Rerun: PYTHONPATH=src python benchmarks/fl_lora_probe.py spectrum --r 64
       PYTHONPATH=src python benchmarks/fl_lora_probe.py final-token --r 64
"""

from __future__ import annotations

import argparse

import torch

from leaklab.attacks.gradient.subspace import numerical_rank
from leaklab.attacks.gradient.views import adapter_rank
from leaklab.corpora import load_corpus, sample_texts
from leaklab.models.registry import ModelRef, load_model
from leaklab.threat.fedsgd import collate
from leaklab.threat.local import TextObjective
from leaklab.threat.lora import LoraSpec, lora_model, lora_update
from leaklab.threat.observation import ThreatFlags

LR = 0.01


def client_update(r: int, seed: int):
    ref = ModelRef("smollm2-135m")
    loaded = load_model(ref)
    texts = sample_texts(load_corpus("rotten-tomatoes"), loaded.tokenizer, 4, seed, 4, 12).texts
    flags = ThreatFlags(batch_size_known=True, learning_rate=LR, local_steps=1)
    obs, sec = lora_update(ref, texts, flags=flags, spec=LoraSpec(r=r, alpha=2 * r))
    return loaded, obs, sec, dict(lora_model(ref, obs.meta["lora"]).named_parameters())


def pseudo_gradient(obs, adapted, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(G', P = Aᵀ(AAᵀ)⁻¹A) of one adapted module."""
    a = adapted[f"base_model.model.{module}.lora_A.default.weight"].detach().double()
    solve = torch.linalg.solve(a @ a.T, a)
    grad_b = obs.gradients[f"base_model.model.{module}.lora_B.default.weight"].double() / LR
    return grad_b @ solve, a.T @ solve


def spectrum(r: int, seed: int) -> None:
    _, obs, sec, adapted = client_update(r, seed)
    ids = [t for s in sec.token_ids for t in s]
    print(f"texts {list(sec.texts)}: {len(ids)} tokens, {len(set(ids))} distinct")
    for layer in (0, 1):
        for slot in "qkv":
            g, _ = pseudo_gradient(obs, adapted, f"model.layers.{layer}.self_attn.{slot}_proj")
            sv = torch.linalg.svdvals(g)
            rel = (sv / sv[0]).tolist()
            k = adapter_rank(g, r)
            window = " ".join(f"{x:.1e}" for x in rel[max(0, k - 3) : k + 3])
            print(
                f"layer {layer} {slot}: rank whole spectrum {numerical_rank(sv)}, r leading {k} (r = {r}); "
                f"σ/σ₁ at {max(0, k - 3) + 1}..{k + 3}: {window}; at r: {rel[r - 1]:.1e}"
                + (f", past r: {rel[r]:.1e}" if len(rel) > r else "")
            )


def final_token(r: int, seed: int, top: int) -> None:
    loaded, obs, sec, adapted = client_update(r, seed)
    modules = [f"model.layers.{layer}.self_attn.v_proj" for layer in (0, 1)]
    scale = 2.0  # α / r
    views = [pseudo_gradient(obs, adapted, m) for m in modules]
    observed = torch.cat([(g / scale).flatten() for g, _ in views])
    model, params = loaded.model, dict(loaded.model.named_parameters())

    def residual(batch: list[list[int]]) -> float:
        model.zero_grad()
        TextObjective(collate(loaded, batch, [0] * len(batch)), "next-token").mean_loss(model).backward()
        grads = [(params[f"{m}.weight"].grad.double() @ p).flatten() for m, (_, p) in zip(modules, views, strict=True)]
        return float((torch.cat(grads) - observed).norm() / observed.norm())

    true = [list(t) for t in sec.token_ids]
    print(f"the true batch: relative residual {residual(true):.1e}")
    for i, ids in enumerate(true):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1]
        order = torch.argsort(logits, descending=True)
        guesses = order[:top].tolist()
        rank = int((order == ids[-1]).nonzero()[0])
        scored = []
        for y in guesses if ids[-1] in guesses else [*guesses, ids[-1]]:
            batch = [list(t) for t in true]
            batch[i] = ids[:-1] + [y]
            scored.append((residual(batch), loaded.tokenizer.decode([y]), y == ids[-1]))
        scored.sort()
        best = ", ".join(f"{w!r} {res:.1e}{' (true)' if ok else ''}" for res, w, ok in scored[:4])
        print(f"{sec.texts[i]!r}: true final token LM rank {rank}; lowest residuals: {best}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["spectrum", "final-token"])
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the 4 private texts")
    ap.add_argument("--top", type=int, default=8, help="final-token: the LM's guesses tried per text")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "spectrum":
        spectrum(args.r, args.seed)
    else:
        final_token(args.r, args.seed, args.top)


if __name__ == "__main__":
    main()
