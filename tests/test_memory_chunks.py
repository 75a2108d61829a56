"""Memory-aware chunking: vocabulary scoring, candidate-sentence gradients and OMP's Gram matrix take their
chunk sizes from the device's free memory; a tiny budget (many small chunks) gives what one chunk gives."""

import pytest
import torch

from leaklab.attacks.gradient import dager, dictionary, omp, subspace
from leaklab.attacks.gradient.dager import SpanModel
from leaklab.models import ModelRef, device
from leaklab.threat import fedsgd_update

TEXTS = ["An utterly charming little comedy", "Nothing here works at all"]


@pytest.fixture(scope="module")
def spans():
    obs, secret = fedsgd_update(ModelRef("tiny-llama"), TEXTS)
    return SpanModel(obs), secret


def budgets(monkeypatch, free: int) -> list[int]:
    """Give the device ``free`` bytes; returns the chunk sizes handed out from then on."""
    sizes: list[int] = []
    real = device.chunk_rows

    def counted(*args, **kwargs) -> int:
        sizes.append(real(*args, **kwargs))
        return sizes[-1]

    monkeypatch.setattr(device, "free_memory_bytes", lambda _dev: free)
    for module in (dager, dictionary, omp, subspace, device):
        if hasattr(module, "chunk_rows"):
            monkeypatch.setattr(module, "chunk_rows", counted)
    monkeypatch.setattr("leaklab.models.adapter.chunk_rows", counted)
    return sizes


def test_a_tiny_memory_budget_gives_the_unchunked_results(spans, monkeypatch):
    spans, secret = spans
    vocab = spans.vocab
    prefixes = [list(t[:-1]) for t in secret.token_ids]
    index = dictionary.sketch_index(spans.obs, dictionary.signal_params(spans.loaded))
    whole = {
        "inputs": subspace.candidate_inputs(spans.adapter, vocab, 0),
        "scores": dager.full_scores(dager.last_token_terms(spans, prefixes)),
        "atoms": dictionary.sentence_gradients(spans.loaded, [list(t) for t in secret.token_ids], None, index),
    }
    whole["distances"] = subspace.screened_distance(whole["inputs"], spans.sub1.basis)
    whole["gram"] = omp.gram_matrix(whole["atoms"])

    sizes = budgets(monkeypatch, 2**20)  # 1 MiB free: 256 KiB per chunk
    tiny = {
        "inputs": subspace.candidate_inputs(spans.adapter, vocab, 0),
        "scores": dager.full_scores(dager.last_token_terms(spans, prefixes)),
        "atoms": dictionary.sentence_gradients(spans.loaded, [list(t) for t in secret.token_ids], None, index),
    }
    tiny["distances"] = subspace.screened_distance(tiny["inputs"], spans.sub1.basis)
    tiny["gram"] = omp.gram_matrix(tiny["atoms"])
    # every site split its work: token inputs, logit rows, sentences, their softmax rows, the screen, Gram columns
    inputs, logits, sentences, *softmax_rows, screen, columns = sizes  # softmax rows: one per batch
    assert inputs < vocab.numel() and screen < vocab.numel(), sizes
    assert logits < sum(map(len, prefixes)) and sentences == 1 and set(softmax_rows) == {1}, sizes
    assert columns < tiny["atoms"].shape[1], sizes
    for name, got in tiny.items():  # float32 round-off of other matmul shapes, relative to the largest entry
        scale = float(whole[name].abs().max())
        torch.testing.assert_close(got, whole[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    gram = tiny["atoms"].double() @ tiny["atoms"].double().T  # the column-chunked sum against one product
    torch.testing.assert_close(tiny["gram"], gram, rtol=1e-12, atol=1e-12 * float(gram.abs().max()))
