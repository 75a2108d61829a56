"""Embedding attacks from the Python API, on a tiny random encoder and on exact toy encoders."""

import dataclasses

import numpy as np
import pytest
import torch
from cli_helpers import NOT_IN_EMBED_BENCH
from embed_toys import bag_encoder

from leaklab.attacks.base import NoSignal
from leaklab.attacks.embedding.access import SearchEndpoint
from leaklab.attacks.embedding.alignment import Alignment, leaked_pairs
from leaklab.attacks.embedding.bow import BagOfWordsInverter, build_vocab
from leaklab.attacks.embedding.clustering import ProbeClustering
from leaklab.attacks.embedding.correction import substitutions
from leaklab.attacks.embedding.decoder import (
    BOS,
    EOS,
    PAD,
    UNK,
    DecoderInverter,
    load_decoder,
    piece_vocab,
)
from leaklab.attacks.embedding.kb import HiddenKB, HttpKB, KBExtractor, KBVectorRecovery
from leaklab.attacks.embedding.lmdecoder import LMDecoderInverter, lm_vocab
from leaklab.attacks.embedding.membership import finetune_simcse, kb_scores
from leaklab.attacks.embedding.nearest import NearestNeighbour
from leaklab.attacks.embedding.registry import EMBED_ATTACKS, Scenario
from leaklab.attacks.embedding.whitebox import (
    WhiteBoxConfig,
    WhiteBoxInverter,
    make_whitebox,
    piece_words,
    vocab_from_texts,
    whole_word_ids,
)
from leaklab.corpora.sampling import split_of
from leaklab.encoders import CallableEncoder, load_encoder
from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.experiments.runner import run_embedding

DOCS = [
    "red apples and green pears",
    "a fast blue car on the road",
    "quiet rain over the old town",
    "the striker scored a late goal",
    "markets fell as oil prices rose",
]
VOCAB = sorted({w for d in DOCS for w in d.split()} | {"banana", "train", "snow", "music", "film"})


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("tiny-bert")


@pytest.fixture(scope="module")
def public():
    scn = Scenario("tiny-bert", n=4, max_tokens=24, public_limit=300)
    return scn.public_texts()


def test_registry_has_all_attacks_and_rejects_unknown():
    assert set(EMBED_ATTACKS.names()) == {
        "nearest",
        "whitebox",
        "bow",
        "decoder",
        "alignment",
        "kb-extract",
        "kb-secrets",
        "clustering",
        "membership",
    }
    with pytest.raises(UnknownNameError, match="valid: alignment, bow"):
        EMBED_ATTACKS.get("nope")


def test_public_texts_never_private(public):
    corpus = Scenario("tiny-bert").corpus_obj
    private = {t for t in corpus.texts if split_of(t) == "private"}
    assert public and not private & set(public)
    extra = Scenario("tiny-bert", max_tokens=24).extra_public_texts("chatterbot:english")
    assert len(extra) > 100 and not private & set(extra) and all(len(t.split()) >= 3 for t in extra)


def test_nearest_finds_present_documents(tiny, public):
    nn = NearestNeighbour(tiny, public[:50] + DOCS[:2])
    res = nn.run(tiny.embed(DOCS[:3]))
    assert res.texts[:2] == DOCS[:2] and res.present.tolist() == [True, True, False]
    with pytest.raises(LeaklabError, match="dimension 3 does not match"):
        nn.run(np.ones((1, 3)))
    with pytest.raises(LeaklabError, match="empty"):
        NearestNeighbour(tiny, [])


def test_bow_trains_saves_and_loads(tiny, public, tmp_path):
    vecs = tiny.embed(public)
    inv = BagOfWordsInverter(tiny.dim, build_vocab(public, 300), hidden=64)
    info = inv.fit(public, vecs, epochs=3, seconds=20)
    assert info["epochs"] >= 1 and info["train_pairs"] == len(public) - len(public) // 10
    inv.save(tmp_path / "bow")
    back = BagOfWordsInverter.load(tmp_path / "bow")
    assert back.invert(vecs[:5]) == inv.invert(vecs[:5])
    np.testing.assert_allclose(back.probabilities(vecs[:5]), inv.probabilities(vecs[:5]), atol=1e-6)
    with pytest.raises(LeaklabError, match="not a 'decoder' one"):
        DecoderInverter.load(tmp_path / "bow", tiny.tokenizer)
    with pytest.raises(LeaklabError, match="NaN"):
        inv.invert(np.full((1, tiny.dim), np.nan, dtype=np.float32))


def test_decoder_trains_saves_loads_and_corrects(tiny, public, tmp_path):
    vecs = tiny.embed(public)
    inv = DecoderInverter(
        tiny.dim, piece_vocab(tiny.tokenizer, public, 300), tiny.tokenizer, emb=32, hidden=64, max_len=12
    )
    info = inv.fit(public, vecs, seconds=3, epochs=1)
    assert info["steps"] >= 1
    inv.save(tmp_path / "dec")
    back = DecoderInverter.load(tmp_path / "dec", tiny.tokenizer)
    assert back.beam_search(vecs[:2], beam=2) == inv.beam_search(vecs[:2], beam=2)
    before = tiny.usage.snapshot()
    out = inv.invert(vecs[:2], tiny, steps=1, beam=2, seeds=[[public[0]], [public[1]]])
    assert len(out) == 2 and tiny.usage.since(before)["queries"] > 0
    # correction keeps the closest hypothesis: the exact text, when seeded, wins
    assert out == public[:2]
    # per-position proposals (one teacher-forced pass) against step-by-step decoding with the hidden state
    seq = tiny.tokenizer(public[2], add_special_tokens=False)["input_ids"][:6]
    got = inv.position_candidates(vecs[2], seq, 5)
    v, h, want = torch.from_numpy(vecs[2:3]), None, []
    for t in range(len(seq) + 1):
        prev = BOS if t == 0 else inv.to_local.get(seq[t - 1], UNK)
        logits, h = inv.model(v, torch.tensor([[prev]]), h)
        row = logits[0, -1].detach().clone()
        row[[PAD, BOS, EOS, UNK]] = -torch.inf
        want.append([inv.piece_ids[i - 4] for i in torch.topk(row, 5).indices.tolist()])
    assert got == want and len(got) == len(seq) + 1
    # mean log p(x, end | v), batched with padding, against the same step-by-step pass
    seqs = [seq, seq[:2], [seq[3], seq[0]]]
    ref = []
    for s in seqs:
        h, total, prev = None, 0.0, BOS
        for nxt in [*(inv.to_local.get(i, UNK) for i in s), EOS]:
            logits, h = inv.model(v, torch.tensor([[prev]]), h)
            total += float(torch.log_softmax(logits[0, -1], -1)[nxt])
            prev = nxt
        ref.append(total / (len(s) + 1))
    np.testing.assert_allclose(inv.mean_logprob(vecs[2], seqs), ref, rtol=1e-4, atol=1e-5)


def test_substitutions_match_brute_force():
    pool = ["good film", "film bad", "good"]
    got = substitutions("a bad film", pool, 100)
    words = ["good", "film", "bad"]  # pool words by how many pool texts hold them (ties: first seen)
    want = [" ".join(w if j == i else o for j, o in enumerate(["a", "bad", "film"])) for w in words for i in range(3)]
    assert got == [t for t in want if t != "a bad film"]
    assert substitutions("a bad film", pool, 2) == got[:2] and substitutions("x", pool, 0) == []
    both = substitutions("a bad film", pool, 100, insert=True)
    base = ["a", "bad", "film"]
    inserted = [" ".join([*base[:i], w, *base[i:]]) for w in words for i in range(4)]
    assert sorted(both) == sorted(got + inserted)


def test_lm_decoder_learns_saves_and_loads(tiny, tmp_path):
    texts = DOCS + ["a long slow film about the sea", "the music was loud and happy"]
    vecs = tiny.embed(texts)
    vocab = lm_vocab(LMDecoderInverter.tokenizer_of("tiny-llama"), texts)
    inv = LMDecoderInverter(tiny.dim, vocab, "tiny-llama", 1, 12)
    before = inv.loss(texts, vecs)
    # bounded by epochs (80 steps), not wall time: a time budget failed on a loaded machine
    info = inv.fit(texts, vecs, seconds=900, epochs=40, batch_size=4, lr=3e-3, cond_lr=3e-3, progress=False)
    assert info["steps"] >= 20 and info["arch"] == "lm"
    after = inv.loss(texts, vecs)
    shuffled = inv.loss(texts, vecs[::-1].copy())
    # it learns the pairs, and the vector (not only the text prior) carries what it learned
    assert after < 0.5 * before and after < shuffled - 0.5
    hyps = inv.beam_search(vecs, beam=2)
    assert sum(h[0] == t for h, t in zip(hyps, texts, strict=True)) >= len(texts) // 2
    inv.save(tmp_path / "lm")
    back = load_decoder(tmp_path / "lm", tiny.tokenizer)
    assert isinstance(back, LMDecoderInverter) and back.beam_search(vecs[:3], beam=2) == hyps[:3]
    assert back.loss(texts, vecs) == pytest.approx(after, abs=1e-5)
    with pytest.raises(LeaklabError, match="'lm' decoder, not a 'gru' one"):
        DecoderInverter.load(tmp_path / "lm", tiny.tokenizer)
    with pytest.raises(LeaklabError, match="dimension 3 does not match"):
        inv.beam_search(np.ones((1, 3), dtype=np.float32))
    with pytest.raises(LeaklabError, match="top=5"):
        LMDecoderInverter(tiny.dim, [5, 6], "tiny-llama", 5)


def test_whitebox_search_never_moves_away_and_its_fast_paths_match_references(tiny):
    target = torch.from_numpy(tiny.embed(["too dull to enjoy"]))
    ids = tiny.tokenizer("too dull to enjoy funny sad great movie", add_special_tokens=False)["input_ids"]
    inv = WhiteBoxInverter(tiny, vocab_ids=ids, candidates=4, passes=2)
    start = ids[4:7]
    seq, cos = inv.search(start, target)
    assert inv.objective([seq], target)[0] >= inv.objective([start], target)[0] - 1e-6
    assert cos == pytest.approx(float(inv.cosines([seq], target)[0]), abs=1e-6)
    # the HotFlip gradient against a central finite difference of the real encoder
    g = inv.gradient(start, target)
    direction = torch.randn(len(start), tiny.dim, generator=torch.Generator().manual_seed(0))
    row = torch.tensor([[inv.cls_id, *start, inv.sep_id]])

    def cos_at(eps: float) -> float:
        x = inv.emb[row].clone()
        x[0, 1:-1] += eps * direction
        return float(torch.nn.functional.cosine_similarity(tiny.forward_embeds(x, torch.ones_like(row)), target))

    fd = (cos_at(1e-3) - cos_at(-1e-3)) / 2e-3
    assert fd == pytest.approx(float((g * direction).sum()), rel=2e-2, abs=1e-5)
    # batched proposal scoring equals one-at-a-time scoring
    props = inv.proposals(start, 1, g, ids[:2])
    assert start[:1] + start[2:] in props and [start[0], ids[0], *start[1:]] in props
    single = [inv.cosines([p], target)[0] for p in props[:6]]
    np.testing.assert_allclose(inv.cosines(props, target)[:6], single, atol=1e-5)
    with pytest.raises(LeaklabError, match="2 starting texts for 1 vectors"):
        inv.invert(target.numpy(), ["a", "b"])
    with pytest.raises(LeaklabError, match="dimension 3 does not match"):
        inv.invert(np.ones((1, 3)))
    with pytest.raises(LeaklabError, match="white-box access"):
        WhiteBoxInverter(bag_encoder(VOCAB))


def test_whitebox_prior_moves_hops_and_budget_match_references(tiny):
    target = torch.from_numpy(tiny.embed(["too dull to enjoy"]))
    ids = tiny.tokenizer("too dull to enjoy funny sad great movie", add_special_tokens=False)["input_ids"]
    whole = whole_word_ids(tiny.tokenizer)
    toks = tiny.tokenizer.convert_ids_to_tokens(whole)
    assert len(whole) > 1000 and not any(t.startswith(("##", "[")) for t in toks) and ids[0] in whole
    # option pieces: the word-piece continuations join the vocabulary (a split word becomes reachable)
    with_pieces = whole_word_ids(tiny.tokenizer, pieces=True)
    cont = [
        i
        for i, t in zip(with_pieces, tiny.tokenizer.convert_ids_to_tokens(with_pieces), strict=True)
        if t.startswith("##")
    ]
    assert set(whole) < set(with_pieces) and set(with_pieces) - set(whole) == set(cont) and len(cont) > 100
    scn = Scenario("tiny-bert", n=2, max_tokens=16, public_limit=200)
    plain_vocab = set(make_whitebox(scn.public_data(), tiny, WhiteBoxConfig(vocab=300, full=True)).vocab.tolist())
    piece_vocab = set(
        make_whitebox(scn.public_data(), tiny, WhiteBoxConfig(vocab=300, full=True, pieces=True)).vocab.tolist()
    )
    assert not plain_vocab & set(cont) and set(cont) <= piece_vocab and plain_vocab <= piece_vocab
    # prior: the words of highest cos(e(w), v), against embedding each word alone
    inv = WhiteBoxInverter(tiny, vocab_ids=ids, candidates=4, passes=2, prior=3, prior_ids=ids)
    single = [float(tiny.embed_ids([[w]])[0] @ target[0].numpy()) for w in ids]
    assert inv.prior_words(target) == [ids[i] for i in np.argsort(single)[::-1][:3]]
    # moves: every re-placement of the token at a position is proposed
    start = ids[4:8]
    props = inv.proposals(start, 1, inv.gradient(start, target))
    rest = start[:1] + start[2:]
    assert all([*rest[:j], start[1], *rest[j:]] in props for j in (0, 2, 3))
    # basin hopping keeps the best objective: never below the plain descent from the same start
    plain = WhiteBoxInverter(tiny, vocab_ids=ids, candidates=4, passes=2)
    hops = WhiteBoxInverter(tiny, vocab_ids=ids, candidates=4, passes=2, hops=3, seed=1)
    s0, _ = plain.search(start, target)
    s1, _ = hops.search(start, target)
    assert hops.objective([s1], target)[0] >= plain.objective([s0], target)[0] - 1e-6
    # the forward budget bounds the search (one proposal batch may overshoot it)
    capped = WhiteBoxInverter(tiny, vocab_ids=ids, candidates=4, passes=6, hops=5, budget=20)
    capped.search(start, target)
    assert capped.forward_passes <= 20 + 2 * len(ids) + 12
    # the encoder's usage counts every forward pass of the search once
    fresh = WhiteBoxInverter(tiny, vocab_ids=ids, candidates=4, passes=1, prior=2, prior_ids=ids)
    before = tiny.usage.queries
    fresh.invert(target.numpy(), ["dull movie"])
    assert tiny.usage.queries - before == fresh.forward_passes > len(ids)


def test_kb_vector_recovery_matches_the_true_document_vectors(tiny, public):
    kb = HiddenKB(public[:8], tiny)
    words = sorted({w for t in public for w in t.lower().split()})
    rec = KBVectorRecovery(load_encoder("tiny-bert", fresh=True), public[20:220], words, top_k=3, per_round=16)
    res = rec.run(SearchEndpoint(kb))
    assert res.adaptive_queries > 0 and min(res.observations.values()) >= tiny.dim + 16
    assert res.discovery_queries + res.adaptive_queries == kb.queries
    for i, doc_id in enumerate(kb.ids):  # reference: the index's own (hidden) normalised vectors
        assert float(res.vectors[doc_id] @ kb._matrix[i]) > 0.999
        assert res.residual[doc_id] < 1e-5
    with pytest.raises(LeaklabError, match="probe texts"):
        KBVectorRecovery(tiny, [], words)


def test_procrustes_recovers_a_rotation_exactly():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    local = rng.standard_normal((40, 16)).astype(np.float32)
    victim = local @ q.T  # victim = local rotated; the map back is q
    mapped = Alignment("procrustes").fit(victim, local).transform(victim[:5])
    np.testing.assert_allclose(mapped, local[:5] / np.linalg.norm(local[:5], axis=1, keepdims=True), atol=1e-4)
    ridge = Alignment("ridge", ridge=1e-8).fit(victim, local)
    np.testing.assert_allclose(ridge.matrix, q, atol=1e-3)  # least squares with k > d finds q too
    with pytest.raises(LeaklabError, match="equal dimensions"):
        Alignment("procrustes").fit(victim[:, :8], local)


def test_alignment_k_larger_than_pairs_is_an_error():
    with pytest.raises(LeaklabError, match="k=10 leaked pairs requested but only 3"):
        leaked_pairs(bag_encoder(VOCAB), DOCS[:3], 10)


def test_kb_extraction_recovers_exact_bags_on_a_bag_encoder():
    enc = bag_encoder(VOCAB)
    kb = HiddenKB(DOCS, enc, max_top_k=5)
    res = KBExtractor(VOCAB, ["the", "a"], top_k=5, candidates=40).run(SearchEndpoint(kb))
    for doc_id, text in res.texts.items():
        assert sorted(text.split()) == sorted(kb.text_of(doc_id).split())
    assert sum(res.queries_per_doc.values()) + res.discovery_queries == kb.queries
    with pytest.raises(LeaklabError, match="top_k"):
        kb.search(["x"], 99)


def test_http_kb_request_and_response_shape():
    import json

    import httpx

    def handler(request):
        body = json.loads(request.content)
        assert request.url.path == "/v1/search" and body["top_k"] == 2
        assert request.headers["authorization"] == "Bearer k1"
        return httpx.Response(
            200,
            json={
                "data": [{"results": [{"id": "d1", "score": 0.9}, {"id": "d2", "score": 0.1}]} for _ in body["query"]]
            },
        )

    kb = HttpKB("http://svc", api_key="k1", client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert kb.search(["a", "b"], 2) == [[("d1", 0.9), ("d2", 0.1)]] * 2 and kb.queries == 2
    with pytest.raises(LeaklabError, match="result lists"):
        HttpKB.parse_response({"data": []}, 1)


def test_clustering_separates_two_topics():
    enc = bag_encoder(VOCAB)
    docs = ["red apples", "green pears", "apples pears", "fast car", "car road", "blue car road"]
    kb = HiddenKB(docs, enc)
    probes = ["apples", "pears", "red green", "car", "road", "blue fast"]
    res = ProbeClustering(probes, enc.embed(probes), clusters=2, top_k=3).run(SearchEndpoint(kb))
    lab = dict(zip(res.doc_ids, res.labels, strict=True))
    assert lab["doc-0"] == lab["doc-1"] == lab["doc-2"] != lab["doc-3"] == lab["doc-4"] == lab["doc-5"]


def test_an_attack_that_finds_nothing_reports_no_signal(monkeypatch, tiny):
    """Probes that retrieve no document carry no signal; the runner records that outcome with the reason and
    no metrics (never a score of 0)."""

    class Silent:
        def search(self, texts, k):
            return [[] for _ in texts]

    probes = ["apples", "pears", "car"]
    with pytest.raises(NoSignal, match="retrieved no document"):
        ProbeClustering(probes, tiny.embed(probes), clusters=2, top_k=3).run(SearchEndpoint(Silent()))

    def nothing(access, public, cfg):
        return ProbeClustering(probes, access.need("encoder").embed(probes)).run(SearchEndpoint(Silent()))

    entry = dataclasses.replace(EMBED_ATTACKS.get("clustering"), impl=nothing)
    monkeypatch.setitem(EMBED_ATTACKS._entries, "clustering", entry)
    rec = run_embedding("clustering", Scenario("tiny-bert", n=4), {"probes": 3})
    assert rec.status == "no_signal" and rec.aggregate is None and rec.options["probes"] == 3
    assert rec.reason == "clustering on 'tiny-bert': the probes retrieved no document"


def test_membership_kb_scores_and_finetune(tiny):
    kb = HiddenKB(DOCS[:3], tiny)
    s = kb_scores(SearchEndpoint(kb), DOCS)
    assert s[:3] == pytest.approx([1.0] * 3, abs=1e-5) and (s[3:] < 0.9999).all()
    tuned = finetune_simcse(tiny, DOCS, epochs=1, batch_size=4)
    assert not np.allclose(tuned.embed(DOCS), tiny.embed(DOCS))
    assert np.allclose(load_encoder("tiny-bert").embed(DOCS[:1]), tiny.embed(DOCS[:1]))  # original untouched


@pytest.mark.parametrize(
    "name,opts",
    [
        ("nearest", {"candidates": 30}),
        ("membership", {"target": "kb"}),
        ("alignment", {"k": "4,8", "inner": "nearest"}),
        ("whitebox", {"max_tokens": 8, "length": 6, "passes": 1, "vocab": 300}),
        ("kb-extract", {"encoder_known": True, "vocab": 150, "wb_vocab": 150, "passes": 1, "wb_candidates": 4}),
    ],
)
def test_scenarios_run_on_tiny(name, opts):
    rep = run_embedding(name, Scenario("tiny-bert", n=4, max_tokens=24, public_limit=60), opts)
    assert rep.attack == name and rep.attack_seconds > 0 and rep.aggregate
    if name == "kb-extract":
        assert rep.observation["flags"]["encoder_known"] is True and rep.aggregate["discovered"] == 4


def test_scenario_errors():
    """Too many leaked pairs for the scenario: the attack could not run (the reason, no metrics); a bad option
    value is the user's error, raised before any work."""
    rec = run_embedding("alignment", Scenario("tiny-bert", n=4), {"k": "50000", "inner": "nearest"})
    assert rec.status == "could_not_run" and rec.aggregate is None and rec.setting == "embedding"
    assert rec.reason.startswith("alignment on 'tiny-bert': k=50000 leaked pairs requested but only")
    with pytest.raises(LeaklabError, match="membership' option 'target': 'nope' is not one of kb, encoder"):
        run_embedding("membership", Scenario("tiny-bert", n=2), {"target": "nope"})


@pytest.mark.real
def test_minilm_nearest_and_kb_membership():
    rep = run_embedding("nearest", Scenario("minilm-l6", n=6, public_limit=40), {"candidates": 40})
    assert rep.aggregate["detect_recall"] == 1.0 and rep.aggregate["exact_recovered_of_present"] == 1.0
    rep = run_embedding("membership", Scenario("minilm-l6", n=10), {"target": "kb"})
    assert rep.aggregate["exact_query"]["auc"] == 1.0


def test_bow_closed_form_matches_sklearn_ridge():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((60, 8)).astype(np.float32))
    y = torch.from_numpy((rng.random((60, 5)) < 0.3).astype(np.float32))
    inv = BagOfWordsInverter(8, ["a", "b", "c", "d", "e"])
    info = inv._fit_ridge(x, y, [], x[:0])
    ref = Ridge(alpha=info["lambda"], fit_intercept=False).fit(x.numpy().astype(np.float64), y.numpy())
    np.testing.assert_allclose(inv.model.weight.detach().numpy(), ref.coef_, atol=1e-4)


def test_whitebox_word_completion_replaces_a_split_word_whole(tiny):
    tok = tiny.tokenizer
    words = ["heartfelt", "whimsical", "mishmash", "haphazard"]
    split = {w: tuple(tok(w, add_special_tokens=False)["input_ids"]) for w in words}
    assert all(len(u) > 1 for u in split.values())
    texts = ["a haphazard, whimsical mishmash", "haphazard heartfelt", "haphazard again"]
    units = piece_words(tok, texts)
    # reference: every split word of the texts once, the most frequent first, ties by first appearance
    assert units == [split[w] for w in ["haphazard", "whimsical", "mishmash", "heartfelt"]]
    assert all(tok.convert_ids_to_tokens(list(u))[1].startswith("##") for u in units)
    # a word assembled from the wrong stem: "<other> ##felt" is completed to "heartfelt" (shared ## piece)
    heart = split["heartfelt"]
    other = tok("dull", add_special_tokens=False)["input_ids"][0]
    wrong = [other, *heart[1:]]
    inv = WhiteBoxInverter(tiny, vocab_ids=[other], candidates=1, passes=1, units=units, words=3)
    assert heart in inv.completions(wrong)
    # reference by brute force: the units sharing the stem or a ## piece, stem matches first
    ref = [u for u in units if u[0] == wrong[0]] + [
        u for u in units if u[0] != wrong[0] and set(u[1:]) & set(wrong[1:])
    ]
    assert inv.completions(wrong) == [u for u in ref if u != tuple(wrong)][:3]
    a = tok("a", add_special_tokens=False)["input_ids"][0]
    seq = [a, *wrong, a]
    target = torch.from_numpy(tiny.embed(["a heartfelt a"]))
    props = inv.proposals(seq, 1, inv.gradient(seq, target))
    assert [a, *heart, a] in props and [a, a] in props  # completed whole, and deleted whole
    assert inv.word_end(seq, 1) == 1 + len(wrong) and inv.word_end(seq, 0) == 1
    # no completion is proposed inside a word, nor with the option off
    assert [a, *heart, a] not in inv.proposals(seq, 2, inv.gradient(seq, target))
    inv.words = 0
    assert [a, *heart, a] not in inv.proposals(seq, 1, inv.gradient(seq, target))
    # option nonword: J − μ per split word outside the unit list, against the formula
    orphan = heart[1]
    assert inv.nonwords([a, *heart, a]) == 0 and inv.nonwords(seq) == 1 and inv.nonwords([orphan, *seq]) == 2
    pen = WhiteBoxInverter(tiny, vocab_ids=[other], candidates=1, passes=1, units=units, words=3, nonword=0.05)
    for x in ([a, *heart, a], seq, [orphan, *seq]):
        formula = inv.cosines([x], target)[0] - 0.01 * len(x) - 0.05 * inv.nonwords(x)
        assert pen.objective([x], target)[0] == pytest.approx(formula, abs=1e-6)
    with pytest.raises(LeaklabError, match=r"must be >= 0, got 1, 0, -0\.1, 0 and 0"):
        WhiteBoxInverter(tiny, vocab_ids=[other], units=units, words=1, nonword=-0.1)
    inv.words = 3
    found, _ = inv.search(seq, target)
    assert inv.objective([found], target)[0] >= inv.objective([seq], target)[0] - 1e-6


def test_whitebox_pool_top_screens_the_pool_by_first_order_gain(tiny):
    tok = tiny.tokenizer
    target = torch.from_numpy(tiny.embed(["too dull to enjoy"]))
    ids = tok("too dull to enjoy funny sad great movie", add_special_tokens=False)["input_ids"]
    pool = tok("boring awful fine nice bad good", add_special_tokens=False)["input_ids"]
    inv = WhiteBoxInverter(tiny, vocab_ids=ids[:2], candidates=1, passes=1, pool_top=2)
    start = ids[4:7]
    g = inv.gradient(start, target)
    # reference: the two pool words of highest <g_t, E_w> at the swap, by a loop
    gains = [float(g[1] @ inv.emb[w]) for w in pool]
    best2 = {pool[i] for i in np.argsort(gains)[::-1][:2]}
    assert set(inv.top_pool(pool, g[1])) == best2
    props = inv.proposals(start, 1, g, pool)
    swapped = {p[1] for p in props if len(p) == len(start) and p[0] == start[0] and p[2:] == start[2:]}
    assert best2 <= swapped and not (set(pool) - best2) & swapped - set(ids[:2])
    # pool_top 0 tries the whole pool
    inv.pool_top = 0
    props = inv.proposals(start, 1, g, pool)
    assert set(pool) <= {p[1] for p in props if len(p) == len(start) and p[0] == start[0] and p[2:] == start[2:]}


def test_whitebox_span_moves_and_common_words_match_references(tiny):
    tok = tiny.tokenizer
    text = "a haphazard teen comedy of the whimsical kind"
    seq = tok(text, add_special_tokens=False)["input_ids"]
    inv = WhiteBoxInverter(tiny, vocab_ids=seq[:2], candidates=1, passes=1, spans=3)
    # reference: split into whole words by the ## prefix, move n = 1..3 words from word a to every other gap
    pieces = tok.convert_ids_to_tokens(seq)
    words: list[list[int]] = []
    for t, p in zip(seq, pieces, strict=True):
        if p.startswith("##") and words:
            words[-1].append(t)
        else:
            words.append([t])
    assert any(len(w) > 1 for w in words)
    starts = np.cumsum([0, *map(len, words)])[:-1].tolist()
    assert inv.word_starts(seq) == starts
    for a, pos in enumerate(starts):
        ref = []
        for n in range(1, 4):
            if a + n > len(words):
                break
            span = [t for w in words[a : a + n] for t in w]
            if len(span) == 1 or len(span) == len(seq):
                continue
            rest = words[:a] + words[a + n :]
            ref.extend(
                [t for w in rest[:b] for t in w] + span + [t for w in rest[b:] for t in w]
                for b in range(len(rest) + 1)
                if b != a
            )
        assert inv.span_moves(seq, pos) == ref
        assert all(sorted(m) == sorted(seq) and m != seq for m in ref)
    # inside a word, or with the option off: no span moves
    inside = next(i for i, p in enumerate(pieces) if p.startswith("##"))
    assert inv.span_moves(seq, inside) == []
    target = torch.from_numpy(tiny.embed(["the haphazard comedy"]))
    g = inv.gradient(seq, target)
    assert [m for m in inv.span_moves(seq, 0) if m not in inv.proposals(seq, 0, g)] == []
    inv.spans = 0
    assert inv.span_moves(seq, 0) == [] and [seq[1], seq[0], *seq[2:]] in inv.proposals(seq, 0, g)
    # option common = m: the m common words of highest <g_t, E_w> are swapped in at t and inserted before t
    common = tok("the of and to is it that in as but with film movie", add_special_tokens=False)["input_ids"]
    inv = WhiteBoxInverter(tiny, vocab_ids=seq[:1], candidates=1, passes=1, common=3, common_ids=common)
    gains = [float(g[2] @ inv.emb[w]) for w in common]
    best3 = {common[i] for i in np.argsort(gains)[::-1][:3]}
    assert set(inv.top_common(g[2])) == best3
    props = inv.proposals(seq, 2, g)
    swapped = {p[2] for p in props if len(p) == len(seq) and p[:2] == seq[:2] and p[3:] == seq[3:]}
    assert best3 <= swapped and not (set(common) - best3) & swapped - {seq[0]}
    near = g[1:3].mean(0)
    ins = {p[2] for p in props if len(p) == len(seq) + 1 and p[:2] == seq[:2] and p[3:] == seq[2:]}
    assert {common[i] for i in np.argsort([float(near @ inv.emb[w]) for w in common])[::-1][:3]} <= ins
    inv.common = 0
    assert inv.top_common(g[2]) == []
    with pytest.raises(LeaklabError, match="option common needs common words"):
        WhiteBoxInverter(tiny, common=2)  # the whole tokenizer, in id order: no ranking to take common words from
    assert WhiteBoxInverter(tiny, vocab_ids=seq, common=2).common_ids == list(dict.fromkeys(seq))
    with pytest.raises(LeaklabError, match=r"got 0, 0, 0\.0, -1 and 0"):
        WhiteBoxInverter(tiny, vocab_ids=seq[:1], spans=-1)
    found, _ = WhiteBoxInverter(tiny, vocab_ids=seq, candidates=2, passes=2, spans=2, common=2).search(seq, target)
    assert inv.objective([found], target)[0] >= inv.objective([seq], target)[0] - 1e-6


def test_whitebox_black_box_mode_searches_through_texts_only(tiny):
    """Black-box mode: the encoder is only ``embed(texts)``; objective, proposals and search against references."""
    tok = tiny.tokenizer
    black = CallableEncoder(tiny.embed, dim=tiny.dim, name="black")
    ids = tok("too dull to enjoy funny sad great movie", add_special_tokens=False)["input_ids"]
    common = tok("the of and", add_special_tokens=False)["input_ids"]
    inv = WhiteBoxInverter(
        black, vocab_ids=ids, length_penalty=0.0, passes=4, common=2, common_ids=common, tokenizer=tok
    )
    white = WhiteBoxInverter(tiny, vocab_ids=ids)
    target = torch.from_numpy(tiny.embed(["too dull to enjoy"]))
    # the text path scores like the white-box id path (whole words: decoding and re-tokenizing is exact)
    seqs = [ids[:4], ids[4:8], [ids[1], ids[0]], ids[2:3]]
    np.testing.assert_allclose(inv.cosines(seqs, target), white.cosines(seqs, target), atol=1e-5)
    assert inv.gradient(ids[:4], target) is None and inv.emb is None
    # proposals at pos: the proposer's words for pos, the pool and the first 2 common words, as swaps and
    # insertions; the deletion and the moves of x_pos (brute-force reference)
    seq, pos, pool = ids[4:8], 1, [ids[0], ids[1]]
    inv._propose = lambda s: [[ids[2]] for _ in range(len(s) + 1)]
    words = [ids[2], ids[0], ids[1], common[0], common[1]]
    rest = seq[:pos] + seq[pos + 1 :]
    ref = [seq[:pos] + [w] + seq[pos + 1 :] for w in words if w != seq[pos]]
    ref += [rest] + [rest[:j] + [seq[pos]] + rest[j:] for j in range(len(rest) + 1) if j != pos]
    ref += [seq[:pos] + [w] + seq[pos:] for w in words]
    assert sorted(inv.proposals(seq, pos, None, pool)) == sorted(ref)
    # the search reaches the target text when its missing word is proposed, and only ever raises J
    start = [ids[0], ids[4], ids[2], ids[3]]  # "too funny to enjoy"
    before, passes = black.usage.snapshot(), inv.forward_passes
    texts, cos = inv.invert(target.numpy(), [tok.decode(start)], None, [lambda s: [[ids[1]]] * (len(s) + 1)])
    assert texts == ["too dull to enjoy"] and cos[0] == pytest.approx(1.0, abs=1e-5)
    # queries: each scored text once, counted by the encoder itself
    assert black.usage.since(before)["queries"] == inv.forward_passes - passes > 0
    found, _ = inv.search(start, target, pool)
    assert inv.objective([found], target)[0] >= inv.objective([start], target)[0] - 1e-6
    # a scorer's term is added to J (e.g. a decoder's fluency), and search leaves none set behind
    plain = inv.objective(seqs, target)
    inv._score = lambda xs: np.array([0.5 * len(x) for x in xs])
    np.testing.assert_allclose(inv.objective(seqs, target), plain + [0.5 * len(x) for x in seqs], atol=1e-6)
    inv.search(start, target, pool, None, lambda xs: np.zeros(len(xs)))
    assert inv._score is None and inv._propose is None
    with pytest.raises(LeaklabError, match="2 proposers for 1 vectors"):
        inv.invert(target.numpy(), None, None, [None, None])
    with pytest.raises(LeaklabError, match="3 scorers for 1 vectors"):
        inv.invert(target.numpy(), None, None, None, [None] * 3)
    with pytest.raises(LeaklabError, match="pool_top screens by gradient"):
        WhiteBoxInverter(black, vocab_ids=ids, pool_top=3, tokenizer=tok)


def test_decoder_search_option_refines_through_black_box_queries():
    opts = {"train_seconds": 3, "epochs": 1, "steps": 1, "hidden": 32, "emb": 16, "vocab": 200}
    scn = Scenario("tiny-bert", n=2, max_tokens=12, public_limit=200)
    base = run_embedding("decoder", scn, opts)
    rep = run_embedding("decoder", scn, {**opts, "search": 120, "prior": 0, "fluency": 0.01})
    assert (
        "≤ 120 queries per vector" in rep.observation["flags"]["search"]
        and base.observation["flags"]["search"] == "none"
    )
    assert rep.info["search_budget"] == 120 and "corrected" in rep.aggregate and "corrected" not in base.aggregate
    # the search starts from the corrected texts (the same as without it) and spends its queries on top
    assert rep.aggregate["corrected"]["token_f1"] == pytest.approx(base.aggregate["token_f1"])
    spent = rep.aggregate["correction_queries_per_target"] - base.aggregate["correction_queries_per_target"]
    assert 0 < spent <= 120 + 200
    # the bag-of-words start and pool (default init=bow) train on public pairs: counted apart from the search
    assert rep.info["search_bow_training_usage"]["queries"] > 0
    with pytest.raises(LeaklabError, match="option 'init': 'empty' is not one of bow, decoder"):
        run_embedding("decoder", Scenario("tiny-bert", n=1), {**opts, "search": 10, "init": "empty"})


def test_whitebox_word_corpora_appends_other_public_split_words(tiny):
    scn = Scenario("tiny-bert", n=2, max_tokens=16, public_limit=200)
    own = make_whitebox(scn.public_data(), tiny, WhiteBoxConfig(vocab=300, words=5)).units
    both = make_whitebox(
        scn.public_data(), tiny, WhiteBoxConfig(vocab=300, words=5, word_corpora="bbc-news:paragraphs")
    ).units
    extra = scn.extra_public_texts("bbc-news:paragraphs", any_length=True)
    # reference: the scenario's own words first, in order, then the new words of the other corpus by frequency
    assert both[: len(own)] == own
    assert both[len(own) :] == [u for u in piece_words(tiny.tokenizer, extra) if u not in set(own) and len(u) <= 24]
    assert len(both) > len(own) + 100
    # any_length keeps the long sentences that the token range leaves out
    assert set(scn.extra_public_texts("bbc-news:paragraphs")) < set(extra)
    # option common with vocab=0 (the whole tokenizer): the common words are the public split's most frequent
    scn = Scenario("tiny-bert", n=2, max_tokens=16, public_limit=200)
    inv = make_whitebox(scn.public_data(), tiny, WhiteBoxConfig(vocab=0, common=3))
    assert inv.common_ids == vocab_from_texts(tiny.tokenizer, scn.public_texts(), 200)
    assert len(inv.common_ids) == 200 and len(inv.vocab) > 1000


@pytest.mark.real
def test_every_attack_runs_on_minilm_with_the_quick_settings():
    """The packaged real encoder, each registered attack once (the quick bench entries, minilm-l6 instead of the
    tiny encoder)."""
    from leaklab.embed_bench import QUICK

    for name in EMBED_ATTACKS.names():
        entry = QUICK[name] if name in QUICK else NOT_IN_EMBED_BENCH[name]
        scn = Scenario("minilm-l6", n=entry["n"], public_limit=entry.get("public_limit"))
        rep = run_embedding(name, scn, entry["options"])
        assert rep.attack == name and rep.aggregate and rep.observation["encoder"] == "minilm-l6", name
        if "cosine" in rep.aggregate:
            assert -1.0 <= rep.aggregate["cosine"] <= 1.0 + 1e-6, name


def test_membership_split_has_no_domain_or_order_shift():
    """Members and non-members are one seeded halving of the same private draw: disjoint, all private, and
    neither drawn from one end of the corpus nor from one length range."""
    from scipy.stats import ks_2samp

    from leaklab.corpora.sampling import split_of
    from leaklab.experiments.scenario import membership_split

    scn = Scenario("tiny-bert", n=150)
    members, non = membership_split(scn)
    assert len(members) == len(non) == 150 and not set(members) & set(non)
    assert all(split_of(t) == "private" for t in members + non)
    where = {t: i for i, t in enumerate(scn.corpus_obj.texts)}
    size = len(scn.corpus_obj.texts)
    pos_m, pos_n = [where[t] / size for t in members], [where[t] / size for t in non]
    assert ks_2samp(pos_m, pos_n).pvalue > 0.01  # corpus order (crawl/time) is not what separates them
    lengths = scn.tokenizer([*members, *non], add_special_tokens=False)["input_ids"]
    assert ks_2samp([len(x) for x in lengths[:150]], [len(x) for x in lengths[150:]]).pvalue > 0.01


@pytest.mark.parametrize(
    "name,opts",
    [("bow", {"augment": 0, "vocab": 300}), ("decoder", {"arch": "gru", "train_seconds": 2, "steps": 0})],
)
def test_attack_options_save_then_load_the_trained_inverter(tmp_path, name, opts):
    folder = str(tmp_path / name)
    first = run_embedding(name, Scenario("tiny-bert", n=4, public_limit=60), {**opts, "save": folder})
    again = run_embedding(name, Scenario("tiny-bert", n=4, public_limit=60), {**opts, "load": folder})
    assert again.info.get("loaded") == folder and "loaded" not in first.info
    assert again.aggregate["token_f1"] == first.aggregate["token_f1"] and again.pairs == first.pairs
    if name == "bow":  # loading spends no training queries (the decoder still embeds public texts as seeds)
        assert first.info["usage"]["queries"] >= 60 > again.info["usage"]["queries"]
