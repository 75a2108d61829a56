"""kb-secrets: planted records recovered through the local index and a live `leaklab serve` /v1/search with the
same query count, the slot search held against brute-force enumeration, ids-only answers, one-line errors."""

import itertools

import numpy as np
import pytest
from cli_helpers import run_cli

from leaklab.attacks.embedding.kb import HiddenKB
from leaklab.attacks.embedding.kbsecrets import (
    HttpSearch,
    KBSecretsAttack,
    KbSecretsConfig,
    LocalSearch,
    VectorSearch,
    recover_vectors,
)
from leaklab.encoders import load_encoder
from leaklab.errors import LeaklabError
from leaklab.service.process import ServerProcess, write_config
from leaklab.service.search_scores import ScoreView
from leaklab.service.store import Store
from leaklab.threat.kbsecrets import Template, candidates_of, plant_secrets, template_of

NAMES = ["Maria Lopez", "John Smith", "Wei Chen", "Anna Novak", "Omar Haddad", "Ines Duarte", "Karl Berg", "Lena Ito"]
CONDITIONS = ["asthma", "diabetes", "epilepsy", "migraine", "gout", "anemia"]
LISTS = {"name": NAMES, "condition": CONDITIONS}
DIAGNOSIS = "{name} was diagnosed with {condition}."
BASE = [
    "The quarterly report shows revenue grew in every region.",
    "Our office in Lisbon moves to a new building next spring.",
    "Please submit travel expenses within thirty days.",
    "The cafeteria serves vegetarian lunch on Fridays.",
    "Security training is mandatory for all new staff.",
    "The board approved the budget for the coming year.",
    "Printers on the third floor are out of toner.",
    "Maria Lopez joined the design team in March.",
    "Parking permits are renewed every January.",
    "The wiki explains how to request a new laptop.",
]


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("tiny-bert")


def _attack(template: str, **kw) -> KBSecretsAttack:
    t = template_of(template)
    lists = {k: v for k, v in LISTS.items() if any(s.space == k for s in t.slots)}
    return KBSecretsAttack(t, {s.key: candidates_of(s, lists) for s in t.slots}, top_k=10, **kw)


def _kb(seed: int = 3):
    return plant_secrets(BASE, [DIAGNOSIS], 1, seed, LISTS)


def test_template_parse_fill_and_plant():
    t = Template.parse("The VPN password for {team} is {word} {word}.")
    assert [s.key for s in t.slots] == ["team", "word", "word2"]
    assert t.fill({"team": "sales", "word": "red", "word2": "fox"}) == "The VPN password for sales is red fox."
    assert t.fill({}) == "The VPN password for is ."
    pin = template_of("pin")
    assert [(s.key, s.kind) for s in pin.slots] == [("name", "name"), ("digits", "digits4")]
    kb = plant_secrets(BASE, ["pin", DIAGNOSIS], 4, 0, LISTS)
    assert len(kb.docs) == len(BASE) + 4 and len(kb.secrets) == 4
    for sec in kb.secrets:
        text = kb.docs[kb.ids.index(sec.doc_id)]
        assert text == template_of(sec.template).fill(dict(sec.values))


def test_bad_input_one_clear_line_each(tmp_path, monkeypatch, capsys):
    with pytest.raises(LeaklabError, match="has no slot"):
        template_of("The PIN is secret")
    with pytest.raises(LeaklabError, match="has no slot"):
        Template.parse("no slots here")
    with pytest.raises(LeaklabError, match="empty candidate list"):
        KBSecretsAttack(template_of(DIAGNOSIS), {"name": NAMES, "condition": []})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(LeaklabError, match=r"slot \{name\} has an empty candidate list"):
        KbSecretsConfig(lists=f"name={empty}")
    with pytest.raises(LeaklabError, match="signal=scores needs scores"):
        KbSecretsConfig(scores=False, signal="scores")
    code, _, err = run_cli(
        monkeypatch, capsys, "attack", "--attack", "kb-secrets", "--encoder", "tiny-bert", "-o", "templates=a PIN"
    )
    assert code == 2 and "has no slot" in err and len(err.strip().splitlines()) == 1


def test_endpoint_without_scores_refused_when_scores_are_needed(tiny):
    kb = _kb()
    endpoint = LocalSearch(HiddenKB(kb.docs, tiny, ids=kb.ids), ScoreView(scores=False))
    with pytest.raises(LeaklabError, match="ids only, but signal=scores needs scores"):
        _attack(DIAGNOSIS, signal="scores").run(endpoint)


def test_score_view_ids_only_noise_and_steps():
    sims = np.array([[0.1, 0.9, 0.5, 0.9]])
    ids = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    assert ScoreView().top_k(sims, ids, 3, rng) == [[("b", 0.9), ("d", 0.9), ("c", 0.5)]]
    assert ScoreView(scores=False).top_k(sims, ids, 2, rng) == [[("b", None), ("d", None)]]
    assert ScoreView(step=0.5).top_k(sims, ids, 4, rng)[0][-1] == ("a", 0.0)
    noisy = ScoreView(noise=0.1).top_k(np.zeros((1, 50)), [str(i) for i in range(50)], 50, rng)[0]
    assert np.std([s for _, s in noisy]) > 0.05
    assert ScoreView(scores=False, step=0.1).label() == "ids-only+score-step(0.1)"


def test_slot_search_agrees_with_brute_force_enumeration(tiny):
    kb = _kb()
    (secret,) = kb.secrets
    template = template_of(DIAGNOSIS)
    index = HiddenKB(kb.docs, tiny, ids=kb.ids)
    brute = LocalSearch(index, ScoreView())
    fills = [dict(zip(("name", "condition"), v, strict=True)) for v in itertools.product(NAMES, CONDITIONS)]
    answers = brute.search_many([template.fill(v) for v in fills], 10)
    scores = [dict(zip(ids, sc or [], strict=True)).get(secret.doc_id, -1.0) for ids, sc in answers]
    reference = fills[int(np.argmax(scores))]
    endpoint = LocalSearch(index, ScoreView())
    res = _attack(DIAGNOSIS).run(endpoint)
    guess = res.guesses[secret.doc_id]
    assert guess.values == reference == dict(secret.values) and guess.exact
    assert res.mode == "scores" and res.queries == endpoint.queries < brute.queries


def test_ids_only_mode_runs_on_ranks(tiny):
    kb = _kb()
    endpoint = LocalSearch(HiddenKB(kb.docs, tiny, ids=kb.ids), ScoreView(scores=False))
    res = _attack(DIAGNOSIS).run(endpoint)
    assert res.mode == "ranks" and not res.noisy and res.queries == endpoint.queries
    (secret,) = kb.secrets
    assert secret.doc_id in res.guesses
    assert set(res.guesses[secret.doc_id].values) == {"name", "condition"}


def _live_vs_local(encoder_name: str, tmp_path) -> None:
    kb = _kb()
    (secret,) = kb.secrets
    corpus = kb.write(tmp_path / "kb.txt")
    cfg = write_config(
        tmp_path / "svc.json",
        {
            "search": {"corpus": str(corpus), "limit": 1000, "max_top_k": 10},
            "limits": {"rate": 1000, "burst": 1000},
            "monitor": {"enabled": False},
        },
    )
    db = tmp_path / "svc.db"
    key = Store(db).create_key("attacker")[1]
    local = LocalSearch(HiddenKB(kb.docs, load_encoder(encoder_name), ids=kb.ids), ScoreView())
    want = _attack(DIAGNOSIS).run(local)
    with ServerProcess(encoder_name, db, cfg) as srv:
        remote = HttpSearch(srv.url, key)
        got = _attack(DIAGNOSIS).run(remote)
        remote.close()
    assert want.guesses[secret.doc_id].values == got.guesses[secret.doc_id].values == dict(secret.values)
    assert want.guesses[secret.doc_id].exact and got.guesses[secret.doc_id].exact
    assert local.queries == remote.queries == want.queries == got.queries
    assert local.requests == remote.requests and local.trace == remote.trace


def test_live_endpoint_matches_local_index_tiny(tmp_path):
    _live_vs_local("tiny-bert", tmp_path)


@pytest.mark.real
def test_live_endpoint_matches_local_index_minilm(tmp_path):
    _live_vs_local("minilm-l6", tmp_path)


@pytest.mark.real
def test_encoder_known_searches_recovered_vectors_with_no_further_query():
    enc = load_encoder("minilm-l6")
    kb = plant_secrets(BASE, ["vpn"], 1, 5)
    (secret,) = kb.secrets
    endpoint = LocalSearch(HiddenKB(kb.docs, enc, ids=kb.ids), ScoreView(decimals=6))
    vectors, spent = recover_vectors(endpoint, enc, [template_of("vpn")], None, 420, 10, 0)
    assert spent == endpoint.queries == 420 and secret.doc_id in vectors
    truth = HiddenKB(kb.docs, enc, ids=kb.ids)._matrix[kb.ids.index(secret.doc_id)]
    assert float(vectors[secret.doc_id] @ truth) > 0.999, float(vectors[secret.doc_id] @ truth)  # the hidden vector
    offline = VectorSearch(enc, vectors)
    res = _attack("vpn").run(offline)
    assert res.guesses[secret.doc_id].values == dict(secret.values)
    assert endpoint.queries == 420 and offline.queries == res.queries > 0


@pytest.mark.parametrize(
    "search,check",
    [
        ({"scores": False}, lambda hits: all(set(h) == {"id"} for h in hits)),
        (
            {"score_step": 0.25},
            lambda hits: all(abs(h["score"] / 0.25 - round(h["score"] / 0.25)) < 1e-6 for h in hits),
        ),
    ],
)
def test_service_search_serves_ids_only_and_quantised_scores(tmp_path, search, check):
    """In-process app: /v1/search answers as its config's score view says, and logs that view."""
    from fastapi.testclient import TestClient

    from leaklab.service.app import DocumentIndex, create_app
    from leaklab.service.config import parse_config
    from leaklab.service.encoders import load_encoder as service_encoder

    enc = service_encoder("hashing")
    store = Store(tmp_path / "s.db")
    _, key = store.create_key("user")
    index = DocumentIndex([f"doc-{i}" for i in range(len(BASE))], enc.embed(BASE))
    client = TestClient(create_app(parse_config({"search": search}), store, enc, index))
    r = client.post("/v1/search", json={"query": "new laptop", "top_k": 4}, headers={"Authorization": f"Bearer {key}"})
    hits = r.json()["data"][0]["results"]
    assert r.status_code == 200 and len(hits) == 4 and check(hits)
    assert store.query_rows()[-1]["defense"] == parse_config({"search": search}).search.view().label()


@pytest.mark.parametrize("escalation", ["ids-only", "score-noise"])
def test_a_flagged_key_under_the_noise_action_gets_escalated_search_answers(tmp_path, escalation):
    """The monitor's ``noise`` action reaches /v1/search: a flagged key gets ids only (or noised scores, σ 0.05,
    so the same query's scores differ between calls) and the log names the escalated view; an unflagged key
    still gets the configured exact scores."""
    from fastapi.testclient import TestClient

    from leaklab.service.app import DocumentIndex, create_app
    from leaklab.service.config import parse_config
    from leaklab.service.encoders import load_encoder as service_encoder

    enc = service_encoder("hashing")
    store = Store(tmp_path / "s.db")
    flagged, flagged_key = store.create_key("probe")
    _, user_key = store.create_key("user")
    store.add_flag(flagged.id, 0.9, "noise", {"queries": 40})
    cfg = parse_config({"monitor": {"action": "noise", "search_escalation": escalation}})
    index = DocumentIndex([f"doc-{i}" for i in range(len(BASE))], enc.embed(BASE))
    client = TestClient(create_app(cfg, store, enc, index))

    def ask(key: str) -> list[dict]:
        r = client.post(
            "/v1/search", json={"query": "new laptop", "top_k": 4}, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200
        return r.json()["data"][0]["results"]

    plain = ask(user_key)
    assert all("score" in h for h in plain) and store.query_rows()[-1]["defense"] == cfg.search.view().label()
    first, second = ask(flagged_key), ask(flagged_key)
    escalated = cfg.monitor.escalate(cfg.search.view())
    assert store.query_rows()[-1]["defense"] == escalated.label() != cfg.search.view().label()
    if escalation == "ids-only":
        assert all(set(h) == {"id"} for h in first + second)
    else:
        assert [h["score"] for h in first] != [h["score"] for h in second]
        assert [h["score"] for h in first] != [h["score"] for h in plain]


def test_an_unknown_search_escalation_is_one_clear_error():
    from leaklab.errors import LeaklabError
    from leaklab.service.config import parse_config

    with pytest.raises(LeaklabError, match="search_escalation' must be one of ids-only, score-noise"):
        parse_config({"monitor": {"search_escalation": "drop"}})
