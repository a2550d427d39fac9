"""Reading documents: every format, field defaults, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
import pytest
from helpers import DATASET, write_jsonl

from indexer.errors import SourceError
from indexer.sources import DocumentSource


def read(path, **kwargs):
    return list(DocumentSource(path, **kwargs))


def test_sample_corpus_defaults_to_product_id_and_title_plus_description():
    source = DocumentSource(DATASET / "corpus.jsonl")
    docs = list(source)
    assert len(docs) == 99
    assert source.id_field == "product_id"
    assert source.text_fields == ["title", "description"]
    first = json.loads((DATASET / "corpus.jsonl").read_text().splitlines()[0])
    assert docs[0].id == first["product_id"]
    assert docs[0].text == f"{first['title']} {first['description']}"
    assert docs[0].metadata == {"category": first["category"], "price": first["price"]}


def test_jsonl_with_chosen_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sku": 7, "name": "Lamp", "body": "Bright", "x": 1}])
    (doc,) = read(path, id_field="sku", text_fields=["body", "name"])
    assert (doc.id, doc.text, doc.metadata) == ("7", "Bright Lamp", {"x": 1})


def test_underscore_id_and_text_defaults(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"_id": "a", "title": "", "text": "hello"}])
    (doc,) = read(path)
    assert (doc.id, doc.text, doc.metadata) == ("a", "hello", {"title": ""})


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('id,text,tag\n1,"first, with comma",a\n2,second,b\n')
    (tmp_path / "d.tsv").write_text("id\ttext\n1\tfirst\n")
    docs = read(tmp_path / "d.csv")
    assert [(d.id, d.text, d.metadata) for d in docs] == [("1", "first, with comma", {"tag": "a"}), ("2", "second", {"tag": "b"})]
    assert [d.text for d in read(tmp_path / "d.tsv")] == ["first"]


def test_json_list_and_label_map(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"id": "x", "text": "one"}, {"id": "y", "text": "two"}]))
    (tmp_path / "labels.json").write_text(json.dumps({"0": "World", "1": "Sports"}))
    assert [(d.id, d.text) for d in read(tmp_path / "list.json")] == [("x", "one"), ("y", "two")]
    assert [(d.id, d.text) for d in read(tmp_path / "labels.json")] == [("0", "World"), ("1", "Sports")]


def test_folder_of_text_files(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("alpha text")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("beta text")
    (tmp_path / "docs" / "ignored.pdf").write_text("not a txt")
    docs = read(tmp_path / "docs")
    assert [(d.id, d.text, d.metadata) for d in docs] == [
        ("a", "alpha text", {"path": "a.txt"}),
        ("sub/b", "beta text", {"path": "sub/b.txt"}),
    ]


def test_gzip_compressed_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"id": 1, "text": "zipped"}) + "\n")
    assert [d.text for d in read(path)] == ["zipped"]


def test_reading_is_lazy(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": 1, "text": "ok"}) + "\n" + "{broken\n")
    stream = iter(DocumentSource(path))
    assert next(stream).text == "ok"
    with pytest.raises(SourceError):
        next(stream)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"id": 1, "text": "ok"}\n{"id": 2, "text": \n', r"bad\.jsonl:2: malformed JSON"),
        ("bad.jsonl", '{"id": 1, "text": "ok"}\n\n{"text": "no id"}\n', r"bad\.jsonl:3: missing id field 'id'"),
        ("bad.jsonl", '{"id": 1, "text": "ok"}\n{"id": 2, "body": "x"}\n', r"bad\.jsonl:2: missing text field 'text'"),
        ("bad.jsonl", '{"id": 1, "text": "ok"}\n{"id": 2, "text": "   "}\n', r"bad\.jsonl:2: empty text"),
        ("bad.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 1, "text": "c"}\n', r"bad\.jsonl:3: duplicate id '1'"),
        ("bad.jsonl", '[1, 2]\n', r"bad\.jsonl:1: expected an object"),
        ("bad.jsonl", '{"name": "x", "text": "y"}\n', r"bad\.jsonl:1: no id field"),
        ("bad.csv", "id,text\n1,ok\n2,\n", r"bad\.csv:3: empty text"),
        ("bad.csv", "id,text\n1,ok,extra\n", r"bad\.csv:2: more values than header fields"),
        # A quote that never closes would take every later row into one field: refused where its row starts.
        ("bad.csv", 'id,text\n1,ok\n2,"open quote\n3,three\n4,four\n', r"bad\.csv:3: a quoted field starts in this row and never ends"),
        ("bad.tsv", 'id\ttext\n1\t"a\nb"\n2\t"open\n3\tthree\n', r"bad\.tsv:4: a quoted field starts in this row and never ends"),
        ("bad.csv", 'id,text\n1,ok\n\n\n2,"open\n3,b', r"bad\.csv:5: a quoted field starts in this row and never ends"),
        ("bad.csv", 'id,"te\nxt\n1,ok\n', r"bad\.csv:1: a quoted field starts in the header and never ends"),
        ("bad.json", '[{"id": 1, "text": "ok"},\n {"id": 2, "text": }]', r"bad\.json:2: malformed JSON"),
        ("lines.json", '{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n',
         r"lines\.json:2: malformed JSON \(Extra data, column 1\); one record a line is JSON Lines: name the file \.jsonl$"),
        ("bad.jsonl", '{"id": "", "text": "ok"}\n', r"bad\.jsonl:1: empty id field 'id'"),
        ("bad.json", '[{"id": 1, "text": "ok"}, {"text": "x"}]', r"bad\.json: record 2: missing id field"),
        ("bad.json", '"just a string"', r"bad\.json: expected a list of records"),
        ("bad.xml", "<doc/>", r"bad\.xml: unknown source format '.xml'"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SourceError, match=message):
        read(path)


def test_delimited_files_read_leniently_where_a_quote_closes(tmp_path):
    """Text after a closing quote is kept, as it always was (common in TSV: a passage that starts with a quotation)."""
    tsv = tmp_path / "quotes.tsv"
    tsv.write_text('id\ttext\n1\t"Weird Al" Yankovic songs\n2\tplain\n3\t"a\nb"')
    assert [(d.id, d.text) for d in read(tsv)] == [("1", "Weird Al Yankovic songs"), ("2", "plain"), ("3", "a\nb")]
    for name, text in (("header-only.csv", "id,text\n"), ("empty.csv", "")):
        (tmp_path / name).write_text(text)
        assert read(tmp_path / name) == []  # the end-of-file mark is never read as a row


def test_not_utf8_missing_and_unreadable_files(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": 1, "text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=r"latin\.jsonl: not UTF-8"):
        read(latin)
    with pytest.raises(SourceError, match=r"nope\.jsonl: no such file"):
        read(tmp_path / "nope.jsonl")
    fake_gzip = tmp_path / "fake.jsonl.gz"
    fake_gzip.write_text('{"id": 1, "text": "not compressed"}\n')
    with pytest.raises(SourceError, match=r"fake\.jsonl\.gz: cannot read"):
        read(fake_gzip)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: folder holds no \.txt files"):
        read(tmp_path / "empty")
