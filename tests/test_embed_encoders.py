"""Encoders: white-box local, callable and HTTP black-box; usage counting; vector checks."""

import json

import httpx
import numpy as np
import pytest
import torch

from leaklab.encoders import HttpEncoder, check_vectors, load_encoder
from leaklab.errors import LeaklabError, UnknownNameError


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("tiny-bert")


def test_tiny_encoder_is_normalised_and_counts(tiny):
    before = tiny.usage.snapshot()
    v = tiny.embed(["a short film", "another one"])
    assert v.shape == (2, 128) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    used = tiny.usage.since(before)
    assert used["queries"] == 2 and used["calls"] == 1 and used["tokens"] == 3 + 2 + 2 + 2


def test_forward_embeds_matches_ids(tiny):
    """The differentiable path (white-box attacks) gives the same vector as embedding the token ids."""
    ids = tiny.tokenizer("a quiet film", add_special_tokens=False)["input_ids"]
    full = torch.tensor([[tiny.tokenizer.cls_token_id, *ids, tiny.tokenizer.sep_token_id]])
    x = tiny.word_embeddings[full].detach().requires_grad_(True)
    v = tiny.forward_embeds(x, torch.ones_like(full))
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert np.allclose(v.detach().numpy(), tiny.embed_ids([ids]), atol=1e-5)
    assert np.allclose(tiny.embed(["a quiet film"]), tiny.embed_ids([ids]), atol=1e-5)


@pytest.mark.real
def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from leaklab.models.registry import minilm_dir

    enc = load_encoder("minilm-l6")
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    texts = ["A gripping, well acted movie.", "boring"]
    assert enc.dim == 384 and enc.pooling == "mean" and enc.normalize
    assert np.abs(enc.embed(texts) - st.encode(texts)).max() < 1e-5


def _openai_server(seen: list):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") != "Bearer sk-test":
            return httpx.Response(401, json={"error": "bad key"})
        body = json.loads(request.content)
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0]}
            for i, t in enumerate(body["input"])
        ]
        return httpx.Response(200, json={"data": data[::-1], "usage": {"prompt_tokens": 7 * len(data)}})

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_http_encoder_openai_shape_and_usage():
    seen: list = []
    enc = HttpEncoder("http://svc", api_key="sk-test", client=_openai_server(seen), batch_size=2)
    assert enc.dim == 3 and seen[0].url.path == "/v1/embeddings"
    enc.usage.queries = enc.usage.calls = enc.usage.tokens = 0
    v = enc.embed(["ab", "abcd", "a"])
    assert v[:, 0].tolist() == [2.0, 4.0, 1.0]  # reordered by index
    assert enc.usage.queries == 3 and enc.usage.calls == 2 and enc.usage.tokens == 21


def test_http_encoder_bad_key_is_one_clear_error():
    with pytest.raises(LeaklabError, match="401"):
        HttpEncoder("http://svc", api_key="wrong", client=_openai_server([]))


def test_check_vectors_errors():
    with pytest.raises(LeaklabError, match="dimension 5 does not match the encoder's dimension 4"):
        check_vectors(np.zeros((2, 5)), 4)
    bad = np.ones((3, 4))
    bad[1, 2] = np.nan
    with pytest.raises(LeaklabError, match="NaN"):
        check_vectors(bad, 4)
    with pytest.raises(LeaklabError, match="non-empty"):
        check_vectors(np.zeros((0, 4)), 4)


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UnknownNameError, match="minilm-l6, tiny-bert"):
        load_encoder("no-such-encoder")


def test_the_service_serves_the_attacks_encoder_type():
    """One Encoder type: the service's encoders are attack encoders (usage counted), with the model's tokenizer
    counting each text's tokens (special tokens, no truncation) and unit-length rows (zero rows stay zero)."""
    from leaklab.encoders import CallableEncoder, Encoder, normalise
    from leaklab.service.encoders import load_encoder as load_served

    enc = load_served("hashing")
    assert isinstance(enc, Encoder) and enc.max_seq_len == 128 and enc.name == "hashing"
    texts = ["a short film", "another one " * 100]
    want = [len(x) for x in enc.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    assert enc.token_counts(texts) == want and want[1] > 128
    before = enc.usage.snapshot()
    v = enc.embed(texts)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert enc.usage.since(before) == {"queries": 2, "calls": 1, "tokens": sum(want), "retried": 0}
    raw = CallableEncoder(lambda t: np.array([[3.0, 4.0], [0.0, 0.0]])[: len(t)], 2, normalize=True, batch_size=None)
    np.testing.assert_allclose(raw.embed(["x", "y"]), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(normalise(np.array([[0.0, 2.0]])), [[0.0, 1.0]])
