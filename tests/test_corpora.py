import json

import pytest

from leaklab.corpora import load_corpus, sample_texts, split_of
from leaklab.errors import LeaklabError, UnknownNameError
from leaklab.models import load_model


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-llama").tokenizer


def test_packaged_corpora_load():
    rt = load_corpus("rotten-tomatoes")
    assert len(rt) > 12000 and rt.label_names == ("fresh", "rotten")
    bbc = load_corpus("bbc-news")
    assert len(bbc) > 2000 and len(bbc.label_names) == 5
    assert len(load_corpus("bbc-news:paragraphs")) > len(bbc)
    it = load_corpus("chatterbot:italian")
    assert len(it) > 1000 and any("cibo" in t.lower() or "robot" in t.lower() for t in it.texts)


def test_unknown_names_list_valid():
    with pytest.raises(UnknownNameError, match="rotten-tomatoes"):
        load_corpus("imdb-nope")
    with pytest.raises(UnknownNameError, match="italian"):
        load_corpus("chatterbot:klingon")


def test_user_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\nsecond line\nfirst line\n", encoding="utf-8")
    assert load_corpus(str(txt)).texts == ("first line", "second line")
    csv = tmp_path / "a.csv"
    csv.write_text("id,body\n1,hello there\n2,general kenobi\n", encoding="utf-8")
    assert load_corpus(str(csv), text_column="body").texts == ("hello there", "general kenobi")
    with pytest.raises(LeaklabError, match="no column 'text'; columns: id, body"):
        load_corpus(str(csv))
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "x y", "label": "a"}) + "\n" + "{oops\n", encoding="utf-8")
    with pytest.raises(LeaklabError, match=r"a\.jsonl:2: not valid JSON"):
        load_corpus(str(jl))


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(LeaklabError, match="empty"):
        load_corpus(str(empty))


def test_sampling_is_seeded_and_length_selected(tok):
    rt = load_corpus("rotten-tomatoes")
    a = sample_texts(rt, tok, 8, seed=3, min_tokens=8, max_tokens=16)
    b = sample_texts(rt, tok, 8, seed=3, min_tokens=8, max_tokens=16)
    c = sample_texts(rt, tok, 8, seed=4, min_tokens=8, max_tokens=16)
    assert a == b and a.texts != c.texts
    assert all(8 <= len(ids) <= 16 for ids in a.token_ids)
    assert len(set(a.texts)) == 8
    assert all(split_of(t) == "private" for t in a.texts)


def test_split_is_fixed_and_disjoint(tok):
    rt = load_corpus("rotten-tomatoes")
    pub = set(sample_texts(rt, tok, 300, 0, split="public").texts)
    priv = set(sample_texts(rt, tok, 300, 0, split="private").texts)
    assert not pub & priv
    share = sum(split_of(t) == "private" for t in rt.texts) / len(rt)
    assert 0.27 < share < 0.33


def test_sampling_errors(tok):
    rt = load_corpus("rotten-tomatoes")
    with pytest.raises(LeaklabError, match="has only"):
        sample_texts(rt, tok, 10**6, 0)
    with pytest.raises(LeaklabError, match=r"no text .* has 400\.\.500 tokens"):
        sample_texts(rt, tok, 2, 0, 400, 500)
    with pytest.raises(LeaklabError, match="bad length range"):
        sample_texts(rt, tok, 2, 0, 10, 5)
