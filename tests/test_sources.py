"""Reading documents: every format, field defaults and every kind of bad input; real-world files (byte-order marks,
repeated keys, CSV types, deep nesting, list text fields), in-memory records, huge documents and the encoder's bounded
tokenising; control characters in ids, folders of mixed files and the size of a whole record."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DATASET, indexer, one_line_error, stored, write_jsonl

from indexer.errors import SourceError
from indexer.settings import MAX_DOCUMENT_BYTES
from indexer.sources import MAX_NESTING, Document, DocumentSource, id_fault, read_records


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


BOM = "\ufeff"


def write_bytes(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# 1. Byte-order marks, in every text format.


@pytest.mark.parametrize("id_header", ["id", "product_id"])
def test_csv_with_bom_and_crlf_reads_its_first_header(tmp_path, id_header):
    path = write_bytes(tmp_path / "sheet.csv", f"{BOM}{id_header},text,colour\r\nA1,first,red\r\nA2,\"two\r\nlines\",blue\r\n")
    source = DocumentSource(path)
    docs = list(source)
    assert source.id_field == id_header
    assert [(d.id, d.text, d.metadata) for d in docs] == [("A1", "first", {"colour": "red"}), ("A2", "two\r\nlines", {"colour": "blue"})]


def test_bom_in_tsv_jsonl_json_gzip_and_txt(tmp_path):
    with gzip.open(tmp_path / "d.tsv.gz", "wb") as f:
        f.write(f"{BOM}id\ttext\n1\tzipped tab\n".encode())
    write_bytes(tmp_path / "d.jsonl", BOM + json.dumps({"id": 1, "text": "line"}) + "\r\n")
    write_bytes(tmp_path / "d.json", BOM + json.dumps([{"id": 1, "text": "list"}]))
    (tmp_path / "docs").mkdir()
    write_bytes(tmp_path / "docs" / "a.txt", BOM + "plain text")
    assert [d.text for d in read(tmp_path / "d.tsv.gz")] == ["zipped tab"]
    assert [d.text for d in read(tmp_path / "d.jsonl")] == ["line"]
    assert [d.text for d in read(tmp_path / "d.json")] == ["list"]
    (doc,) = read(tmp_path / "docs")
    assert doc.text == "plain text" and doc.fields == {"text": "plain text"}
    # Query files for evaluate are read the same way.
    write_bytes(tmp_path / "queries.csv", f"{BOM}query,document\r\nhow?,d1\r\n")
    assert [r for _, r in read_records(tmp_path / "queries.csv")] == [{"query": "how?", "document": "d1"}]


# 2. Repeated keys are refused, not silently resolved to the last.


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("map.json", '{"doc1": "a", "doc2": "b", "doc1": "c"}', r"map\.json: duplicate id 'doc1'"),
        ("d.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "text": "a", "text": "b"}\n', r"d\.jsonl:2: duplicate field 'text'"),
        ("d.json", '[{"id": 1, "text": "a", "id": 2}]', r"d\.json: record 1: duplicate field 'id'"),
        ("map.json", '{"doc1": {"text": "a", "text": "b"}}', r"map\.json: key 'doc1': duplicate field 'text'"),
        ("d.jsonl", '{"id": 1, "text": "a", "m": [{"k": 1, "k": 2}]}\n', r"d\.jsonl:1: duplicate field 'k' in field 'm'"),
        ("d.csv", "id,text,text\n1,a,b\n", r"d\.csv:1: duplicate field 'text' in the header"),
    ],
)
def test_repeated_keys_are_refused(tmp_path, name, content, message):
    path = write_bytes(tmp_path / name, content)
    with pytest.raises(SourceError, match=message):
        read(path)


# 3. CSV and TSV columns get types, as sqlite-utils --detect-types gives them.

TYPED_CSV = (
    "id,text,price,stock,sku,plus,mixed,missing,empty,special,huge\n"
    "0012,first,5,5,007,+5,10,3,,nan,1e999\n"
    "13,second,12.5,0,010,6,x,,,inf,2\n"
    "14,third,30,-3,100,7,20,7,,1.5,3\n"
    "15,fourth,150,150,200,8,30,,,2,4\n"
    "16,42,29.99,1,300,9,40,1,,3,5\n"
)


def test_csv_numeric_columns_become_numbers(tmp_path):
    path = write_bytes(tmp_path / "d.csv", TYPED_CSV)
    docs = read(path)
    first, second = docs[0].metadata, docs[1].metadata
    assert [d.metadata["price"] for d in docs] == [5.0, 12.5, 30.0, 150.0, 29.99]
    assert all(type(d.metadata["price"]) is float for d in docs)
    assert [d.metadata["stock"] for d in docs] == [5, 0, -3, 150, 1]
    assert all(type(d.metadata["stock"]) is int for d in docs)
    # Leading zeros, a plus sign, one word, nan/inf and overflow keep a column text.
    assert (first["sku"], first["plus"], first["mixed"], first["special"], first["huge"]) == ("007", "+5", "10", "nan", "1e999")
    # Empty cells: null in a numeric column, "" in a text one.
    assert (first["missing"], second["missing"], first["empty"]) == (3, None, "")
    # The id and text fields keep their exact strings.
    assert (docs[0].id, docs[4].text, docs[4].fields) == ("0012", "42", {"text": "42"})


def test_gzipped_tsv_is_typed_and_raw_records_stay_text(tmp_path):
    path = tmp_path / "d.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("id\ttext\tscore\tcode\n1\ta\t-2.5e3\t12345678901234567890\n2\tb\t7\t1\n")
    # A 20-digit value is a code, not a number: it would not fit 64 bits, and a float would round it.
    assert [d.metadata for d in read(path)] == [{"score": -2500.0, "code": "12345678901234567890"}, {"score": 7.0, "code": "1"}]
    assert [r["score"] for _, r in read_records(path)] == ["-2.5e3", "7"]


def test_numeric_csv_filter_compares_numbers(tmp_path, tiny_model):
    from indexer import Index, IndexSettings, build_index

    path = write_bytes(tmp_path / "d.csv", TYPED_CSV)
    build_index(path, tmp_path / "index", IndexSettings(model=str(tiny_model)))
    hits = Index(tmp_path / "index").search("first", k=10, where=[("price", "<", 30)])
    assert sorted(h.id for h in hits) == ["0012", "13", "16"]


# 4. Deep nesting is a user error, not a RecursionError.


def deep(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


def test_json_nested_past_the_parser_names_file_and_line(tmp_path):
    jsonl = write_bytes(tmp_path / "d.jsonl", '{"id": 1, "text": "a"}\n' + f'{{"id": 2, "text": "x", "m": {deep(10_000)}}}\n')
    with pytest.raises(SourceError, match=r"d\.jsonl:2: JSON nested too deeply"):
        read(jsonl)
    whole = write_bytes(tmp_path / "d.json", '[\n{"id": 1, "text": "a"},\n' + f'{{"id": 2, "text": "x", "m": {deep(10_000)}}}]')
    with pytest.raises(SourceError, match=r"d\.json:3: JSON nested too deeply"):
        read(whole)


def test_json_number_over_pythons_digit_limit_is_a_user_error(tmp_path):
    path = write_bytes(tmp_path / "d.jsonl", '{"id": 1, "text": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(SourceError, match=r"d\.jsonl:1: malformed JSON \(Exceeds the limit"):
        read(path)


def test_metadata_nesting_is_capped(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"id": 1, "text": "x", "m": json.loads(deep(MAX_NESTING))}])
    assert json.dumps(read(ok)[0].metadata["m"]) == deep(MAX_NESTING)
    records = [{"id": 1, "text": "x"}, {"id": 2, "text": "x", "m": {"a": [{"b": json.loads(deep(MAX_NESTING - 2))}]}}]
    too_deep = write_jsonl(tmp_path / "deep.jsonl", records)
    with pytest.raises(SourceError, match=rf"deep\.jsonl:2: field 'm' is nested more than {MAX_NESTING} levels deep"):
        read(too_deep)


# 5 and 6. Text field values and Document.fields.


def test_list_number_and_boolean_text_fields(tmp_path):
    records = [
        {"id": 1, "title": ["First paragraph.", " ", "Second paragraph."], "description": "tail", "tags": ["a"]},
        {"id": 2, "title": True, "description": 12.5},
        {"id": 3, "title": ["n", 7, False], "description": None},
    ]
    docs = read(write_jsonl(tmp_path / "d.jsonl", records))
    assert [d.text for d in docs] == ["First paragraph. Second paragraph. tail", "true 12.5", "n 7 false"]
    # fields are the text fields as written, so each record is rebuilt from id, fields and metadata.
    assert [d.fields for d in docs] == [{k: r[k] for k in ("title", "description")} for r in records]
    assert [{"id": int(d.id), **d.fields, **d.metadata} for d in docs] == records
    assert {d.origin for d in docs} == {"source"}


@pytest.mark.parametrize(
    "value, got",
    [({"a": 1}, "got object"), (["text", {"a": 1}], "got a list holding object"), (["a", ["b"]], "got a list holding list"),
     (["a", None], "got a list holding null")],
)
def test_objects_and_nested_lists_are_not_text(tmp_path, value, got):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "ok"}, {"id": 2, "text": value}])
    with pytest.raises(SourceError, match=rf"d\.jsonl:2: text field 'text' must be a string or a list of strings, {got}"):
        read(path)


def test_fields_for_csv_and_json_label_maps(tmp_path):
    csv_doc = read(write_bytes(tmp_path / "d.csv", "sku,title,description,price\n07,Lamp,Bright,3\n"), id_field="sku")[0]
    assert (csv_doc.id, csv_doc.fields, csv_doc.metadata) == ("07", {"title": "Lamp", "description": "Bright"}, {"price": 3})
    labels = read(write_bytes(tmp_path / "labels.json", '{"0": "World"}'))
    assert [(d.id, d.fields) for d in labels] == [("0", {"text": "World"})]


# 7. In-memory records (the HTTP API's), in either shape.

INDEX_FIELDS = {"id_field": "product_id", "text_fields": ["title", "description"]}


def test_records_in_the_source_shape_and_the_stored_document_shape():
    stored = {"id": "p2", "text": "Kept text", "metadata": {"price": 4}, "fields": {"title": "Kept", "description": "text"}}
    records = [
        {"product_id": "p1", "title": "Lamp", "description": ["Bright", "and warm"], "price": 3},
        stored,
        {"id": "p3", "fields": {"description": "second", "title": "first"}},
        {"id": "p4", "text": "only text"},
    ]
    source = DocumentSource.from_records(records, **INDEX_FIELDS)
    docs = list(source)
    assert source.path == "documents"
    assert docs[0] == Document("p1", "Lamp Bright and warm", {"price": 3}, {"title": "Lamp", "description": ["Bright", "and warm"]})
    assert docs[1] == Document("p2", "Kept text", {"price": 4}, stored["fields"])
    assert docs[2] == Document("p3", "first second", {}, {"description": "second", "title": "first"})
    assert docs[3] == Document("p4", "only text", {}, {})
    # What GET /documents/{id} returns reads back as the same document.
    as_returned = [{k: getattr(d, k) for k in ("id", "text", "metadata", "fields")} for d in docs]
    assert list(DocumentSource.from_records(as_returned, **INDEX_FIELDS)) == docs


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}], r"^documents: record 3: duplicate id 'a'$"),
        ([{"product_id": "a", "title": "x"}], r"^documents: record 1: missing text field 'description'$"),
        ([{"id": "a", "fields": {"title": " "}}], r"^documents: record 1: empty text$"),
        ([{"text": "x", "metadata": {}}], r"^documents: record 1: missing id field 'product_id'$"),
        ([{"id": "a", "text": "x", "metadata": {"m": json.loads(deep(MAX_NESTING + 1))}}], r"^documents: record 1: field 'm' is nested"),
        ([{"id": "a", "fields": {"title": {"b": 1}}}], r"^documents: record 1: text field 'title' must be a string"),
        (["just text"], r"^documents: record 1: expected an object"),
    ],
)
def test_bad_records_name_the_record(records, message):
    with pytest.raises(SourceError, match=message):
        list(DocumentSource.from_records(records, **INDEX_FIELDS))


def test_records_over_the_size_limit_and_a_custom_name():
    source = DocumentSource.from_records([{"id": "a", "text": "x" * 101}], name="batch", max_document_bytes=100)
    with pytest.raises(SourceError, match=r"^batch: record 1: text is 101 bytes, over the limit of 100 \(--max-document-bytes\)$"):
        list(source)


# 8a. Oversized documents are refused, counted in UTF-8 bytes.


def test_text_over_the_byte_limit_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "é" * 400}, {"id": 2, "text": "é" * 600}])
    with pytest.raises(SourceError, match=r"d\.jsonl:2: text is 1200 bytes, over the limit of 1000 \(--max-document-bytes\)"):
        read(path, max_document_bytes=1000)
    assert DocumentSource(path).max_document_bytes == MAX_DOCUMENT_BYTES
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "big.txt").write_text("a" * (MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(SourceError, match=rf"big\.txt: text is {MAX_DOCUMENT_BYTES + 1} bytes, over the limit"):
        read(tmp_path / "docs")


# 8b. The encoder tokenises a bounded prefix of a huge text, with the same result.


def whole_ids(encoder, text: str) -> list[int]:
    """Token ids the slow way: the tokenizer over the whole text, then truncation."""
    return encoder.tokenizer(text, truncation=True, max_length=encoder.max_length)["input_ids"]


@pytest.mark.slow
def test_huge_text_embeds_as_its_beginning(encoder):
    sentence = "The quick brown fox jumps over the lazy dog near the riverbank. "
    text = sentence * (20_000_000 // len(sentence))
    (ids,) = encoder.tokenize([text])
    assert ids == whole_ids(encoder, text[:200_000]) and len(ids) == encoder.max_length
    np.testing.assert_array_equal(encoder.encode_texts([text, "short"])[:1], encoder.encode_texts([text[:200_000]]))


@pytest.mark.slow
def test_huge_text_is_tokenised_in_bounded_memory(tiny_model):
    # Peak memory of a fresh process (ru_maxrss, KiB) across tokenising a 20 MB text: the tokenizer
    # run over the whole text takes gigabytes, over a prefix almost nothing.
    script = f"""
import resource
from indexer.encoder import Encoder
encoder = Encoder({str(tiny_model)!r})
text = "The quick brown fox jumps over the lazy dog. " * 450_000
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(ids,) = encoder.tokenize([text])
assert len(ids) == encoder.max_length
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, check=True)
    assert int(result.stdout) < 200 * 1024


@pytest.mark.parametrize(
    "text",
    [
        " ".join(f"word{i}" for i in range(200)).replace(" ", " " * 10_000),  # every prefix cut lands in spaces
        "start " + "x" * 1_000_000 + " end of it all " * 300,  # a word far longer than the first prefix
        "y" * 500_000,  # no space at all: only the whole text is safe
        "a" * 4090 + " ab" * 3000,  # the first prefix ends inside a word that holds the last needed tokens
        ("naïve café " * 20 + "\n\t") * 2000,  # accents and other whitespace
        "日本語のテキスト" * 10_000 + " tail",  # CJK without spaces
    ],
)
def test_prefix_tokenising_equals_whole_text(encoder, text):
    assert encoder.tokenize([text, "short"]) == [whole_ids(encoder, text), whole_ids(encoder, "short")]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_nan_and_infinity_in_metadata_are_refused(tmp_path, value):
    """SQLite's JSON functions and HTTP responses cannot hold them: one bad value would break every filter."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "text": "fine", "x": 1}\n{"id": "b", "text": "bad", "x": ' + value + "}\n")
    with pytest.raises(SourceError, match=r"d.jsonl:2: field 'x'"):
        list(DocumentSource(path))
    with pytest.raises(SourceError, match="documents: record 1: field 'x'"):
        list(DocumentSource.from_records([{"id": "b", "text": "bad", "x": float("nan")}]))


# Lone surrogates: a JSON escape without its pair, or bytes that are not UTF-8 in a file name or an argument.


def test_a_lone_surrogate_is_refused_where_it_is_and_a_pair_is_kept(tmp_path):
    """Neither the tokenizer nor SQLite takes one (the tokenizer raised a TypeError): refused, naming the record."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "text": "emoji \\ud83d\\ude00 kept"}\n{"id": "b", "text": "fine", "tags": {"k": ["x", "\\udc00"]}}\n')
    with pytest.raises(SourceError, match=r"d.jsonl:2: '\\udc00' holds \\udc00 at character 1, a lone UTF-16 surrogate"):
        list(DocumentSource(path))
    path.write_text('{"id": "a", "text": "emoji \\ud83d\\ude00 kept", "escaped": "\\\\ud800 is six characters"}\n')
    (doc,) = read(path)
    assert doc.text == "emoji \U0001f600 kept" and doc.metadata == {"escaped": "\\ud800 is six characters"}
    (tmp_path / "d.json").write_text('{"a": "fine", "b": {"text": "half \\uD83D"}}')
    with pytest.raises(SourceError, match=r"d.json: key 'b': 'half \\ud83d' holds \\ud83d at character 6"):
        read(tmp_path / "d.json")
    with pytest.raises(SourceError, match=r"documents: record 2: 'k\\udfff' holds"):
        list(DocumentSource.from_records([{"id": "a", "text": "fine"}, {"id": "b", "text": "t", "meta": {"k\udfff": 1}}]))
    with pytest.raises(SourceError, match=r"documents: record 1: 'ok\\ud800' holds"):  # in a tuple, as Python callers pass
        list(DocumentSource.from_records([{"id": "a", "text": "fine", "tags": ("x", "ok\ud800")}]))
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.txt").write_text("fine")
    try:
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:
            f.write(b"a Latin-1 name")
        with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl"), "wb") as f:
            f.write(b'{"id": "a", "text": "fine"}\n')
    except OSError:  # a file system that only takes UTF-8 names: nothing to refuse
        return
    with pytest.raises(SourceError, match=r"docs: in the file name 'caf\\udce9.txt', byte 0xe9 at character 4 is not UTF-8; rename it"):
        read(folder)
    # The source's own name is recorded in the manifest: refused before anything is read.
    with pytest.raises(SourceError, match=r"in the source's name '.*caf\\udce9.jsonl', byte 0xe9 at character \d+ is not UTF-8"):
        DocumentSource(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl")))


def test_the_cli_refuses_lone_surrogates_in_one_line_and_keeps_the_index(tmp_path, tiny_model):
    from helpers import run_cli, tree_digest

    index = tmp_path / "idx"
    run_cli("build", str(write_jsonl(tmp_path / "good.jsonl", [{"id": "a", "text": "fine"}])), "--index", str(index), "--model", str(tiny_model))
    before = tree_digest(index)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "half \\ud800 a pair"}\n')
    build = run_cli("build", str(bad), "--index", str(index), "--model", str(tiny_model), check=False)
    assert build.returncode == 3 and build.stderr.strip().splitlines() == [
        f"indexer: error: {bad}:2: 'half \\ud800 a pair' holds \\ud800 at character 6, a lone UTF-16 surrogate, which is not Unicode text"]
    # An argument with bytes that are not UTF-8 reaches Python as lone surrogates too.
    for mode in ("dense", "keyword", "hybrid"):
        query = run_cli("query", str(index), "caf\udce9", "--mode", mode, check=False)
        assert query.returncode == 2 and query.stderr.strip().splitlines() == [
            "indexer: error: query 'caf\\udce9' holds \\udce9 at character 4, a lone UTF-16 surrogate, which is not Unicode text"]
    assert tree_digest(index) == before


# 1. An id may hold no control character, in any source format.


@pytest.mark.parametrize(
    "name, content, shown",
    [
        ("nul.jsonl", json.dumps({"id": "ok", "text": "fine"}) + "\n" + json.dumps({"id": "invoice-42\u0000x", "text": "t"}) + "\n",
         "nul.jsonl:2: id 'invoice-42\\x00x' holds the control character '\\x00' at character 11"),
        ("newline.csv", 'id,text\nok,fine\n"a\nb",t\n', "newline.csv:4: id 'a\\nb' holds the control character '\\n'"),
    ],
)
def test_an_id_with_a_control_character_fails_the_build(tmp_path, tiny_model, name, content, shown):
    source = tmp_path / name
    source.write_text(content)
    result = indexer("build", source, "--index", tmp_path / "idx", "--model", tiny_model)
    one_line_error(result, SourceError.exit_code, shown)
    assert not (tmp_path / "idx").exists()


def test_every_format_refuses_control_characters_in_ids(tmp_path):
    (tmp_path / "tab.tsv").write_text('id\ttext\n"a\tb"\tt\n')
    (tmp_path / "del.json").write_text(json.dumps({"a\u007fb": "text"}))
    (tmp_path / "c1.jsonl").write_text(json.dumps({"id": "a\u0085b", "text": "t"}) + "\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "line\nbreak.txt").write_text("text")
    for name, message in [("tab.tsv", r"tab\.tsv:2: id 'a\\tb' holds the control character '\\t'"),
                          ("del.json", r"del\.json: key 'a\\x7fb': id 'a\\x7fb' holds the control character '\\x7f'"),
                          ("c1.jsonl", r"c1\.jsonl:1: id 'a\\x85b' holds the control character '\\x85'"),
                          ("docs", r"docs: in the file name 'line\\nbreak\.txt', holds the control character '\\n'")]:
        with pytest.raises(SourceError, match=message) as caught:
            list(DocumentSource(tmp_path / name))
        assert "\n" not in str(caught.value)
    with pytest.raises(SourceError, match=r"^batch: record 1: id 'x\\ry' holds"):
        list(DocumentSource.from_records([{"id": "x\ry", "text": "t"}], name="batch"))
    assert id_fault("invoice-42") is None and id_fault("naïve ✓ 42") is None
    assert id_fault("a\u0000b") == "holds the control character '\\x00' at character 2; an id may hold no control characters"


# 13. A folder source reads Markdown and reStructuredText, and skips empty files and other types with a warning.


def test_a_folder_with_empty_markdown_and_other_files_builds(tmp_path, tiny_model):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "empty.txt").touch()
    (notes / "blank.md").write_text("  \n\n")
    (notes / "plain.txt").write_text("plain text")
    (notes / "readme.md").write_text("# Rivers\n\nAbout rivers.")
    (notes / "sub" / "guide.rst").write_text("Guide\n=====\n\nMountains.")
    (notes / "long.markdown").write_text("*long* form")
    (notes / "scan.pdf").write_bytes(b"%PDF-1.4")
    (notes / ".DS_Store").write_bytes(b"\x00")  # hidden: not content, not worth a word
    result = indexer("build", notes, "--index", tmp_path / "idx", "--model", tiny_model, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 4
    assert f"indexer: warning: {notes}: skipped 2 empty files, 1 file of an unknown type (.pdf)" in result.stderr
    assert stored(tmp_path / "idx") == {"long": "*long* form", "plain": "plain text", "readme": "# Rivers\n\nAbout rivers.",
                                        "sub/guide": "Guide\n=====\n\nMountains."}
    source = DocumentSource(notes)
    assert len(list(source)) == 4
    assert source.warnings == [f"{notes}: skipped 2 empty files, 1 file of an unknown type (.pdf)"]


def test_a_folder_of_nothing_readable_says_what_it_holds(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("a.pdf", "b.pdf", "c.docx"):
        (tmp_path / "scans" / name).write_bytes(b"binary")
    with pytest.raises(SourceError, match=r"scans: folder holds no \.txt files, nor \.md, \.markdown or \.rst; "
                                          r"it holds 3 files of an unknown type \(2 \.pdf, 1 \.docx\)$"):
        list(DocumentSource(tmp_path / "scans"))


# 7d. The byte limit covers a whole record: its metadata as stored, not only its text.


def test_metadata_over_the_byte_limit_is_refused(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": "small", "text": "short", "tags": ["x"] * 10},
                                                {"id": "heavy", "text": "short", "notes": "é" * 600}])
    result = indexer("build", source, "--index", tmp_path / "idx", "--model", tiny_model, "--max-document-bytes", 1000)
    one_line_error(result, SourceError.exit_code,
                   "d.jsonl:2: text and metadata are 1218 bytes (1213 of metadata as stored), over the limit of 1000")
    assert not (tmp_path / "idx").exists()
    nested = DocumentSource.from_records([{"id": "a", "text": "t", "m": {"deep": [["y" * 200]]}}], name="batch", max_document_bytes=200)
    with pytest.raises(SourceError, match=r"^batch: record 1: text and metadata are 224 bytes \(223 of metadata as stored\)"):
        list(nested)
    stored_shape = DocumentSource.from_records([{"id": "a", "text": "t", "metadata": {"m": "z" * 300}}], name="put", max_document_bytes=200)
    with pytest.raises(SourceError, match=r"^put: record 1: text and metadata are 310 bytes \(309 of metadata as stored\)"):
        list(stored_shape)
    # Counting what is stored needs it as JSON: a Python object an API handed in is refused on one line, not later.
    dated = DocumentSource.from_records([{"id": "a", "text": "t", "metadata": {"day": datetime.date(2024, 1, 1)}}], name="api")
    with pytest.raises(SourceError, match=r"^api: record 1: metadata is not JSON \(Object of type date is not JSON serializable\)$"):
        list(dated)
