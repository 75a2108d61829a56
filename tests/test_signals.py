"""Red-team signals on constructed dumps whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leaklab.cli import app
from leaklab.service.defenses import tenant_rotation
from leaklab.service.encoders import load_encoder
from leaklab.signals import (
    VectorSet,
    cross_source,
    fingerprint,
    load_vectors,
    repeated_embeddings,
    save_vectors,
)

LONG = " ".join(f"word{i % 50} plain text" for i in range(80))  # > 126 WordPiece tokens


@pytest.fixture(scope="module")
def enc():
    return load_encoder("hashing")


@pytest.fixture(scope="module")
def chat():
    from leaklab.corpora import load_corpus

    return list(load_corpus("chatterbot:english").texts[:300])


def test_repeated_finds_each_cause(enc):
    texts = [
        "Hello   World",
        "hello world",
        LONG + " ending one",
        LONG + " ending two",
        "price \u2603\ufe0e now",
        "price \u2602 now",
        "a normal sentence",
        "another different line",
        "cached query one",
        "cached query two",
        "near query one",
        "near query two",
    ]
    vecs = enc.embed(texts)
    vecs[9] = vecs[8]  # a cache returning the same vector for another text
    vecs[11] = vecs[10] + 1e-4  # a near-collision
    vs = VectorSet(vecs, texts)
    rep = repeated_embeddings(vs, 1e-4, enc.tokenizer, enc.max_seq_len)
    causes = {frozenset((e["a"][:12], e["b"][:12])): e["cause"] for e in rep["examples"]}
    assert causes[frozenset(("Hello   Worl", "hello world"))] == "normalisation"
    assert rep["by_cause"]["truncation"] == 1
    assert rep["by_cause"]["unknown-token collapse"] == 1
    assert rep["by_cause"]["caching"] == 1 and rep["by_cause"]["near-collision"] == 1
    assert rep["pairs"] == 5  # nothing else collides


def test_lsh_candidates_match_brute_force(enc, chat):
    from leaklab.signals.repeated import candidate_pairs

    x = enc.embed(chat[:200])
    x = np.concatenate([x, x[:40] + 1e-3 * np.random.default_rng(0).standard_normal((40, x.shape[1]))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    brute = {(i, j) for i in range(len(x)) for j in range(i + 1, len(x)) if sims[i, j] >= 0.999}
    assert brute and brute <= candidate_pairs(x)


def test_fingerprint_names_documents_and_encoder(enc, chat):
    leaked_idx = list(range(10, 60))
    leak = VectorSet(
        np.concatenate(
            [
                enc.embed([chat[i] for i in leaked_idx]),
                enc.embed(["an unseen secret line", "another private one"]),
            ]
        )
    )
    rep = fingerprint(leak, chat, {"hashing": enc, "tiny-bert": load_encoder("tiny-bert")})
    assert rep["encoders"][0]["encoder"] == "hashing" and rep["present_count"] == 50
    assert sorted(p["doc"] for p in rep["present"]) == leaked_idx
    rotated = VectorSet(leak.vectors @ tenant_rotation("s" * 16, "t", 128).T)
    rep2 = fingerprint(rotated, chat, {"hashing": enc})
    assert rep2["present_count"] == 0 and "no candidate" in rep2["verdict"]


def test_cross_source_verdicts(enc, chat):
    a = enc.embed(chat)
    rot = a @ tenant_rotation("s" * 16, "t", 128).T
    ids = [str(i) for i in range(len(chat))]
    same = cross_source(VectorSet(a, ids=ids), VectorSet(rot, ids=ids))
    assert same["mode"] == "paired" and same["verdict"].startswith("same model")
    tiny = load_encoder("tiny-bert").embed(chat)
    other = cross_source(VectorSet(a, ids=ids), VectorSet(tiny, ids=ids))
    assert not other["verdict"].startswith("same model") and other["procrustes_residual"] > 0.2
    shuffled = cross_source(VectorSet(a), VectorSet(rot[np.random.default_rng(1).permutation(len(rot))]), "paired")
    assert shuffled["verdict"].startswith("unrelated")
    anch = cross_source(VectorSet(a), VectorSet(rot), "anchors", anchors=200)
    assert anch["anchor_residual"] < 1e-3 and anch["mapped_share_nn_cos_0.99"] > 0.9
    perm = np.random.default_rng(2).permutation(len(a))
    unp = cross_source(VectorSet(a[perm[:150]]), VectorSet(rot[perm[150:]]), "unpaired")
    assert unp["verdict"].startswith("consistent"), unp
    unp2 = cross_source(VectorSet(a[perm[:150]]), VectorSet(tiny[perm[150:]]), "unpaired")
    assert unp2["verdict"].startswith("different"), unp2


def test_signals_cli_and_bad_dump(tmp_path, enc, chat):
    from typer.testing import CliRunner

    from leaklab.errors import LeaklabError

    path = save_vectors(tmp_path / "d.jsonl", VectorSet(enc.embed(chat[:40]), chat[:40]))
    back = load_vectors(path)
    assert back.texts == chat[:40] and np.allclose(back.vectors, enc.embed(chat[:40]), atol=1e-6)
    res = CliRunner().invoke(
        app,
        [
            "signals",
            "fingerprint",
            "--dump",
            str(path),
            "--docs",
            "chatterbot:english",
            "--limit",
            "300",
            "--encoders",
            "hashing",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["present_count"] == 40
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"embedding": [1, 2]}\n{"embedding": [1]}\n')
    with pytest.raises(LeaklabError, match=r"bad\.jsonl:2: vector has 1 dimensions"):
        load_vectors(bad)


@pytest.mark.real
def test_minilm_truncates_at_256_tokens():
    """Red-team finding on the real encoder: texts that differ only after 254 tokens get the same vector."""
    enc = load_encoder("minilm-l6")
    texts = [
        LONG + " " + LONG + " the ending is happy",
        LONG + " " + LONG + " the ending is sad",
        "short text",
    ]
    rep = repeated_embeddings(VectorSet(enc.embed(texts), texts), 1e-4, enc.tokenizer, enc.max_seq_len)
    assert rep["pairs"] == 1 and rep["by_cause"]["truncation"] == 1


def test_repeated_in_service_log(tmp_path):
    from leaklab.service.store import LogRow, Store
    from leaklab.signals.repeated import repeated_in_log

    store = Store(tmp_path / "s.db")
    rec, _ = store.create_key("k")
    store.admit_and_log(rec.id, "embeddings", [LogRow("t1", 2, "v1"), LogRow("t2", 2, "v1")], "none", 0, 0)
    store.admit_and_log(rec.id, "embeddings", [LogRow("t3", 2, "v2"), LogRow("t4", 2, "v2")], "gaussian(x)", 0, 0)
    store.admit_and_log(rec.id, "embeddings", [LogRow("t5", 2, "v3"), LogRow("t5", 2, "v3")], "none", 0, 0)
    store.close()
    rep = repeated_in_log(tmp_path / "s.db")
    causes = {g["vector_hash"]: g["likely_cause"] for g in rep["examples"]}
    assert rep["groups"] == 2 and causes["v2"].startswith("caching") and not causes["v1"].startswith("caching")
