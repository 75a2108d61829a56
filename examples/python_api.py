"""leaklab's Python API on a model of your own: one gradient computed with plain transformers, attacked by SOMP.

    python examples/python_api.py [--out DIR]

It saves the packaged tiny-llama (a 2-layer random Llama on the real SmolLM2 tokenizer) as an ordinary Hugging
Face folder, computes one FedSGD gradient of two short private texts with plain ``transformers`` — as a
client of your federation would — hands the ``{parameter name: gradient}`` dict to leaklab with what the server
knows (the batch size), runs SOMP and scores the recovery. The last line printed is ``rouge1=<value>``.
Offline: the model comes from leaklab's packaged assets.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import leaklab

PRIVATE_TEXTS = ["the patient was seen on tuesday", "my pin code is nine four two"]


def save_model_folder(folder: Path) -> None:
    """Stand-in for the user's own model: leaklab's tiny-llama written with save_pretrained."""
    from leaklab.models.registry import load_model

    loaded = load_model(leaklab.ModelRef("tiny-llama"))
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def client_gradient(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """What a FedSGD client shares: ∇θ of the mean next-token loss over its batch, by parameter name."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.zero_grad()
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="folder for the saved model (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp) / "my-model"
        save_model_folder(folder)
        grads = client_gradient(folder, PRIVATE_TEXTS)
        obs = leaklab.observation_from_gradients(folder, grads, setting="fedsgd", batch_size=len(PRIVATE_TEXTS))
        recovery = leaklab.attack("somp", obs)
        if recovery.status != "recovered":
            raise SystemExit(f"somp {recovery.status.replace('_', ' ')}: {recovery.reason}")
        for text in recovery.texts:
            print(f"recovered: {text}")
        scores = leaklab.score(obs, PRIVATE_TEXTS, recovery)
        print(f"rouge1={scores['rouge1']}")


if __name__ == "__main__":
    main()
