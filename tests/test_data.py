"""Corpora: the offline default, local files, hub datasets offline, and document selection by length."""

from __future__ import annotations

import json

import pytest

from lctx import data


class CharTokenizer:
    """One token per character, optional BOS: lengths in tokens are lengths in characters (+1)."""

    def __init__(self, bos: bool = False):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_default_corpus_is_the_python_manual_split_into_contiguous_parts() -> None:
    from pydoc_data.topics import topics

    corpus = data.open_corpus()
    assert corpus.id == "pydoc"
    (whole,) = corpus.documents(1)
    assert whole.name == "pydoc"
    assert whole.text == "\n\n".join(text for _, text in sorted(topics.items()))
    for parts in (2, 3, 5):
        docs = list(corpus.documents(parts))
        assert [d.name for d in docs] == [f"pydoc-part-{i + 1}-of-{parts}" for i in range(parts)]
        assert "\n\n".join(d.text for d in docs) == whole.text  # contiguous, nothing lost or repeated
        sizes = [len(d.text) for d in docs]
        assert max(sizes) < 1.6 * len(whole.text) / parts  # near-equal (topic boundaries allow some slack)
        assert docs[0].text.startswith(whole.text[:1000])  # sample 1 always starts at the beginning
        assert list(corpus.documents(parts)) == docs  # deterministic
    assert "split at topic boundaries into 3" in corpus.describe(3)
    assert "one document" in corpus.describe(1)


def test_text_file_directory_and_jsonl(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("alpha beta")
    corpus = data.open_corpus(tmp_path / "one.txt")
    assert [(d.name, d.text) for d in corpus.documents()] == [("one.txt", "alpha beta")]

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    (folder / "skip.md").write_text("not a document")
    assert [d.text for d in data.open_corpus(folder).documents(3)] == ["first", "second"]

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "x1", "body": "y1"}) + "\n\n" + json.dumps({"text": "x2", "body": "y2"}) + "\n")
    assert [d.text for d in data.open_corpus(rows).documents()] == ["x1", "x2"]
    assert [d.text for d in data.open_corpus(rows, text_field="body").documents()] == ["y1", "y2"]
    assert data.open_corpus(rows).id != data.open_corpus(rows, text_field="body").id


def test_file_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_corpus(tmp_path / "missing.txt")
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(data.DataError, match=r"\.txt file, a directory of \.txt files or a \.jsonl"):
        data.open_corpus(tmp_path / "table.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="no .txt files"):
        data.open_corpus(empty)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(data.DataError,
                       match=r"rows.jsonl:1 has no string field 'text' \(found: content\).*--text-field"):
        list(data.open_corpus(rows).documents())
    rows.write_text("{not json\n")
    with pytest.raises(data.DataError, match=r"rows.jsonl:1 is not valid JSON"):
        list(data.open_corpus(rows).documents())
    with pytest.raises(data.DataError, match="either --data or --dataset"):
        data.open_corpus(rows, "pg19")


def test_select_skips_short_documents_and_names_the_longest(tmp_path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, size in (("a", 50), ("b", 300), ("c", 120), ("d", 400)):
        (folder / f"{name}.txt").write_text("x" * size)
    corpus = data.open_corpus(folder)
    tok = CharTokenizer(bos=True)
    chosen = data.select(corpus, tok, 200, samples=2)
    assert [name for name, _ in chosen.docs] == ["b.txt", "d.txt"]
    assert chosen.skipped == 2  # a and c are shorter than 200 tokens: skipped, never padded
    assert [len(ids) for _, ids in chosen.docs] == [301, 401]  # BOS included, as the tokenizer adds it
    fewer = data.select(corpus, tok, 350, samples=2)
    assert [name for name, _ in fewer.docs] == ["d.txt"] and fewer.requested == 2
    with pytest.raises(data.DataError, match=r"has 500 tokens: the longest has 401 tokens \(4 documents"):
        data.select(corpus, tok, 500, samples=1)


def test_special_prefix_and_token_stream(tmp_path) -> None:
    assert data.special_prefix(CharTokenizer(bos=True)) == [1]
    assert data.special_prefix(CharTokenizer(bos=False)) == []
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("abc")
    (folder / "b.txt").write_text("de")
    stream = data.token_stream(data.open_corpus(folder), CharTokenizer(bos=True), 4)
    assert stream.ids == [ord(c) for c in "abc\n\nde"] and stream.names == ["a.txt", "b.txt"]  # no BOS inside
    assert stream.ends((".", "c")) == [False, False, True, False, False, False, False]
    assert data.corpus(str(folder)) is data.corpus(str(folder))  # one object per source: tokenized once
    assert data.corpus("pydoc").id == "pydoc" and data.corpus("hf:pg19#x").id.startswith("hf:pg19")


def test_dataset_offline_says_so_and_suggests_data(monkeypatch) -> None:
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'emozilla/pg19-test' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    corpus = data.open_corpus(dataset="emozilla/pg19-test")  # lazy: nothing is fetched yet
    assert not calls
    with pytest.raises(data.DataError, match=r"cannot load dataset 'emozilla/pg19-test:test'.*offline.*--data PATH"):
        list(corpus.documents())
    assert calls[0] == (("emozilla/pg19-test", None), {"split": "test", "streaming": True})


def test_dataset_spec_parsing(monkeypatch) -> None:
    assert data.parse_dataset("pg19") == ("pg19", None, "test")
    assert data.parse_dataset("wikitext:wikitext-103-raw-v1:validation") == (
        "wikitext", "wikitext-103-raw-v1", "validation")
    for bad in ("", ":x", "a::b", "a:b:c:d"):
        with pytest.raises(data.DataError, match=r"NAME\[:config\]\[:split\]"):
            data.parse_dataset(bad)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"content": "x"}]))
    with pytest.raises(data.DataError, match=r"no field 'text' \(fields: content\)"):
        list(data.open_corpus(dataset="some/set").documents())
