"""Access objects of embedding attacks: what each grants and counts, budgets, and that an attack receives only
them and the public data (never the Scenario, the victim's secret or its private texts)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
from embed_toys import bag_encoder

from leaklab.attacks.base import CannotRun, NoSignal
from leaklab.attacks.embedding.access import (
    Access,
    BlackBoxEncoder,
    BudgetSpent,
    EncoderWeights,
    LeakedPairs,
    LeakedVectors,
    PublicData,
    SearchEndpoint,
    vectors_in_encoder_space,
)
from leaklab.attacks.embedding.kb import HiddenKB
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, Scenario
from leaklab.core import Config
from leaklab.encoders import load_encoder
from leaklab.experiments import scenario as victim_side
from leaklab.experiments.runner import run_embedding

VOCAB = ["red", "green", "apples", "pears", "fast", "car", "road", "blue", "the", "a", "pad"]
DOCS = ["red apples", "green pears", "fast car", "blue car road"]


def test_black_box_encoder_counts_every_text_request_and_token_and_its_budget_stops_with_one_line():
    inner = bag_encoder(VOCAB)
    box = BlackBoxEncoder(inner, budget=5)
    out = box.embed(["red apples", "fast car"])
    np.testing.assert_allclose(out, inner.embed(["red apples", "fast car"]))  # the wrapped encoder's vectors
    box.embed(["blue"])
    assert (box.usage.queries, box.usage.calls) == (3, 2)
    assert box.usage.tokens == inner.count_tokens(["red apples", "fast car", "blue"])
    with pytest.raises(BudgetSpent, match="query budget of 5 texts spent: 3 used, this request asks for 3 more"):
        box.embed(["a", "b", "c"])
    assert isinstance(BudgetSpent("x"), CannotRun) and box.usage.queries == 3  # refused before any query
    box.embed(["a", "b"])  # what is left of the budget can still be spent
    assert box.usage.queries == 5 and box.grants() == {"black_box_encoder": {"encoder": "toy-bag", "budget": 5}}


def test_black_box_encoder_counts_a_disk_cache_hit_of_a_local_encoder_as_a_query():
    tiny = load_encoder("tiny-bert")
    first, again = BlackBoxEncoder(tiny), BlackBoxEncoder(tiny)
    texts = ["a cached text for the counting test", "and a second one"]
    np.testing.assert_allclose(first.embed(texts), again.embed(texts), atol=1e-6)
    assert first.usage.queries == again.usage.queries == 2 and again.usage.tokens == first.usage.tokens > 0


def test_search_endpoint_answers_ids_and_scores_by_text_or_vector_and_counts_queries():
    enc = bag_encoder(VOCAB)
    kb = HiddenKB(DOCS, enc, max_top_k=3)
    search = SearchEndpoint(kb, budget=4)
    ids, scores = search.search("red apples", 2)
    assert ids[0] == "doc-0" and len(ids) == 2 and scores[0] == pytest.approx(1.0, abs=1e-5)
    by_vector = search.search(enc.embed(["fast car"])[0], 1)
    assert by_vector[0] == ["doc-2"] and by_vector[1][0] == pytest.approx(1.0, abs=1e-5)
    both = search.search_many(["green pears", "blue car road"], 1)
    assert [row[0] for row in both] == [["doc-1"], ["doc-3"]]
    assert (search.queries, search.calls) == (4, 3)
    with pytest.raises(BudgetSpent, match="search query budget of 4 texts spent"):
        search.search("red", 1)
    ids_only = SearchEndpoint(kb, scores=False)
    assert ids_only.search("red apples", 1) == (["doc-0"], None)
    with pytest.raises(CannotRun, match="ids only"):
        ids_only.hits(["red"], 1)
    assert ids_only.grants() == {"search_endpoint": {"scores": False, "budget": None}}

    class TextsOnly:  # a remote index that takes query texts only
        def search(self, texts, k):
            return [[("d", 0.5)] for _ in texts]

    with pytest.raises(CannotRun, match="query texts only"):
        SearchEndpoint(TextsOnly()).search(np.ones(4, dtype=np.float32), 1)


def test_leaked_vectors_pairs_weights_and_reference_grants_and_usage():
    tiny = load_encoder("tiny-bert")
    vecs = np.ones((3, 8), dtype=np.float32)
    pairs = LeakedPairs(["x", "y"], np.ones((2, 8), dtype=np.float32))
    weights = EncoderWeights(tiny)
    tiny.embed(["one white-box forward pass", "and another"])
    access = Access(vectors=LeakedVectors(vecs, "victim-enc"), pairs=pairs, weights=weights, hints={"topics": 4})
    assert access.grants() == {
        "leaked_vectors": {"count": 3, "dim": 8, "encoder": "victim-enc"},
        "leaked_pairs": 2,
        "encoder_weights": "tiny-bert",
        "hint_topics": 4,
    }
    assert access.usage()["queries"] == 2  # the weights' forward passes since the grant
    with pytest.raises(CannotRun, match="needs search access, which this scenario does not grant"):
        access.need("search")


def test_leaked_pairs_map_a_rotated_victim_space_onto_the_black_box_one():
    enc = bag_encoder(VOCAB)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((len(VOCAB), len(VOCAB))))
    texts = ["red apples", "green pears", "fast car", "blue car road", "the road", "a red car", "blue pears"]
    texts += [" ".join(VOCAB[i : i + 2]) for i in range(len(VOCAB) - 1)]
    victim = enc.embed(texts) @ q  # the victim's space: a secret rotation of the attacker's
    leaked = LeakedVectors(enc.embed(DOCS) @ q, "rotated")
    plain = Access(vectors=leaked, encoder=BlackBoxEncoder(enc))
    assert vectors_in_encoder_space(plain) is leaked.vectors  # no pairs: nothing to map with
    mapped = vectors_in_encoder_space(Access(leaked, BlackBoxEncoder(enc), pairs=LeakedPairs(texts, victim)))
    np.testing.assert_allclose(mapped, enc.embed(DOCS), atol=1e-4)


def test_every_registered_attack_takes_access_public_and_config_only():
    for entry in EMBED_ATTACKS.entries(hidden=True):
        params = list(inspect.signature(entry.impl).parameters)
        assert params == ["access", "public", "cfg"], entry.name
        assert entry.extra.get("case") in victim_side.CASES, entry.name


def _public_strings(obj, depth=0, seen=None):
    """Every string reachable through public attributes, lists, tuples and dicts (not through ``_``-names)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _public_strings(v, depth + 1, seen)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _public_strings(v, depth + 1, seen)
    elif isinstance(getattr(obj, "__dict__", None), dict) and not isinstance(obj, type):
        for k, v in vars(obj).items():
            if not k.startswith("_"):
                yield from _public_strings(v, depth + 1, seen)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("bow", {}),
        ("decoder", {}),
        ("nearest", {}),
        ("kb-extract", {}),
        ("clustering", {"kb_max_tokens": 32}),
        ("membership", {"target": "kb"}),
        ("alignment", {"k": "4"}),
    ],
)
def test_an_attack_never_receives_the_scenario_or_the_private_texts(monkeypatch, name, opts):
    """Spy on what the runner hands the attack: an Access and PublicData (no Scenario, no secret); no private
    target text is reachable through them except the hints the threat model grants (recorded in the flags)."""
    built = {}
    build = victim_side.build_case

    def spy_build(entry, scn, cfg):
        built["case"] = build(entry, scn, cfg)
        return built["case"]

    def spy(access, public, cfg):
        built["args"] = (access, public, cfg)
        raise NoSignal("spy: stop before any work")

    monkeypatch.setattr("leaklab.experiments.runner.build_case", spy_build)
    monkeypatch.setitem(EMBED_ATTACKS._entries, name, dataclasses.replace(EMBED_ATTACKS.get(name), impl=spy))
    rec = run_embedding(name, Scenario("tiny-bert", n=4, max_tokens=24, public_limit=60), opts)
    assert rec.status == "no_signal" and rec.aggregate is None
    access, public, cfg = built["args"]
    assert isinstance(access, Access) and isinstance(public, PublicData) and isinstance(cfg, Config)
    secret = set(built["case"].secret.texts)
    granted = {t for v in access.hints.values() if isinstance(v, list) for t in v}
    reachable = set(_public_strings(access)) | set(_public_strings(public)) | set(public.texts())
    assert not (reachable - granted) & secret, name
    for value in (*vars(access).values(), *vars(public).values()):
        assert not isinstance(value, Scenario | victim_side.EmbedSecret), name
