"""--data hf:PATH (memlm.data.hf_datasets): local text, JSON lines and Parquet files read through the
`datasets` library's packaged loaders, streamed, a document per file (text) or per row."""

from __future__ import annotations

import json

import pytest

from memlm.data import SPLITS, ByteTokenizer, DataError, prepare
from memlm.data.sources import parse_spec

pytest.importorskip("datasets", reason="the data extra (datasets) is not installed")

ROWS = [f"row {i}: def f{i}(x):\n    return x * {i} ✓\n" for i in range(24)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))


def documents_of(corpus) -> list[str]:
    """Every document of a prepared corpus, all splits, as text."""
    texts = []
    for name in SPLITS:
        if corpus.manifest["splits"][name]["documents"]:
            texts += ByteTokenizer().decode(corpus.split(name).tokens).split("<|eod|>")[:-1]
    return texts


def write_jsonl(path, rows, field="text"):
    path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(rows)))
    return path


def test_jsonl_rows_are_documents(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS + [""])  # the empty row is skipped
    corpus = prepare(f"hf:{path}", fractions=(0.5, 0.25, 0.25), progress=False)
    assert sorted(documents_of(corpus)) == sorted(ROWS)
    assert sum(info["documents"] for info in corpus.manifest["splits"].values()) == len(ROWS)
    assert corpus.manifest["sources"][0]["kind"] == "hf" and corpus.manifest["sources"][0]["builder"] == "json"
    assert all(corpus.manifest["splits"][s]["documents"] for s in SPLITS)  # rows spread over the splits by name


def test_text_files_of_a_directory_are_one_document_each(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    files = {f"sub/part{i}.txt" if i % 2 else f"part{i}.txt": "\n".join(ROWS[i:i + 3]) for i in range(8)}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / ".hidden.txt").write_text("never read")
    source = parse_spec(f"hf:{root}")[0]
    assert [d.name for d in source.documents()] == [f"{n}#000000000" for n in sorted(files)]
    corpus = prepare(f"hf:{root}", fractions=(0.5, 0.25, 0.25), progress=False)
    assert sorted(documents_of(corpus)) == sorted(files.values())  # whole files, lines kept together


def test_parquet_and_a_named_field(tmp_path):
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow (which datasets needs for parquet) is not installed")
    import pyarrow.parquet as pq
    for shard in range(2):
        rows = ROWS[shard * 12:(shard + 1) * 12]
        pq.write_table(pyarrow.table({"content": rows, "n": list(range(len(rows)))}), tmp_path / f"s{shard}.parquet")
    corpus = prepare(f"hf:{tmp_path}/*.parquet:field=content", fractions=(0.5, 0.25, 0.25), progress=False)
    assert sorted(documents_of(corpus)) == sorted(ROWS)
    with pytest.raises(DataError, match="no field 'text'.*content"):
        prepare(f"hf:{tmp_path}/*.parquet", progress=False)


def test_documents_stream_one_at_a_time(tmp_path):
    """Rows arrive as they are read: the first document comes before the file's end is parsed (a bad
    line after the first 10 MiB block, the json loader's chunk, fails only when reached), so a
    corpus larger than memory is tokenised in one pass."""
    path = tmp_path / "data.jsonl"
    line = json.dumps({"text": "y" * 1000}) + "\n"
    path.write_text(json.dumps({"text": "first"}) + "\n" + line * 11_000 + "x" * 10 + "\n")  # 11 MB, then not JSON
    documents = parse_spec(f"hf:{path}")[0].documents()
    assert bytes(next(documents).data) == b"first"
    assert all(bytes(next(documents).data) == b"y" * 1000 for _ in range(100))
    with pytest.raises(DataError, match="cannot read .*data.jsonl"):
        for _ in documents:
            pass


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "data source not found: hf:"),
    (lambda p: (p / "a.csv").write_text("x") and p / "a.csv", "cannot read a.csv"),
    (lambda p: [write_jsonl(p / "a.jsonl", ["x"]), (p / "b.txt").write_text("y")] and p, "mixes file kinds"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "matches no"),
])
def test_bad_hf_specs_are_clear_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        prepare(f"hf:{make(tmp_path)}", progress=False)


def test_a_non_text_field_is_a_clear_error(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="holds int, not text"):
        prepare(f"hf:{path}", progress=False)
