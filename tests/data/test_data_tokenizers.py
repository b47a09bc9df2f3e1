"""Tokenizers beyond bytes (memlm.data.tokenizers): bpe:N round trips, token file dtypes, hf:PATH
tokenizer.json files, prepared corpora that keep their tokenizer, and bad specs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlm.data import SPLITS, ByteTokenizer, DataError, prepare, token_dtype
from memlm.data.tokenizers import TOKENIZER_FILE, load_tokenizer, make_tokenizer, parse_spec

tokenizers = pytest.importorskip("tokenizers", reason="the tok extra (tokenizers) is not installed")

TEXTS = ["def add(a, b):\n    return a + b\n", "héllo wörld ✓ 日本語\n", "class Foo:\n    pass\n"] * 20


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer("bpe:300", iter(TEXTS))


def write_corpus(root, documents: int = 30):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (root / f"doc{i:02d}.py").write_text(f"# módulo {i} ✓\n" + TEXTS[i % 3] * (i % 4 + 1))
    return root


def test_bpe_round_trips_text_and_bytes(bpe):
    assert bpe.kind == "bpe" and 257 <= bpe.vocab_size <= 300 and bpe.eod == 0
    text = "def héllo(x):\n    return '日本' + x  # <|eod|> is text here\n"
    ids = bpe.encode(text, eod=True)
    assert ids[-1] == bpe.eod and bpe.eod not in ids[:-1]  # a literal <|eod|> is not the end of the document
    assert len(ids) - 1 < len(text.encode())  # merges: fewer tokens than bytes
    assert bpe.decode(ids[:-1]) == text and bpe.decode(ids) == text + "<|eod|>"
    assert b"".join(bpe.token_bytes(int(i)) for i in ids) == text.encode()  # exact bytes per token
    lengths = bpe.byte_lengths()
    assert lengths.shape == (bpe.vocab_size,) and lengths[bpe.eod] == 1
    assert int(lengths[ids].sum()) == len(text.encode()) + 1
    assert bpe.encode(text.encode()).tolist() == ids[:-1].tolist()  # bytes read as UTF-8


def test_bpe_saved_and_loaded_is_the_same_tokenizer(bpe, tmp_path):
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path, bpe.describe())
    assert again.sha256 == bpe.sha256 and again.encode(TEXTS[1]).tolist() == bpe.encode(TEXTS[1]).tolist()
    tampered = (tmp_path / TOKENIZER_FILE).read_text().replace('"use_regex":true', '"use_regex":false')
    assert tampered != bpe.json
    (tmp_path / TOKENIZER_FILE).write_text(tampered)
    with pytest.raises(DataError, match="SHA-256"):
        load_tokenizer(tmp_path, bpe.describe())


def test_token_dtype_holds_every_id_and_is_uint16_up_to_65535():
    for vocab in [1, 255, 256, 257, 300, 65534, 65535, 65536, 65537, 100_000, 2 ** 31, 2 ** 32]:
        dtype = token_dtype(vocab)
        assert dtype == (np.dtype("<u2") if vocab <= 65535 else np.dtype("<u4")), vocab
        assert int(np.array([vocab - 1]).astype(dtype)[0]) == vocab - 1  # the largest id survives
    for bad in (0, 2 ** 32 + 1):
        with pytest.raises(DataError):
            token_dtype(bad)


def word_level_tokenizer(path, words: int):
    """A tokenizer.json of `words` whole words w0 ... w{words-1} split at whitespace (no EOD of its own)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.save(str(path))
    return path


def test_a_big_hf_vocabulary_writes_uint32_token_files(tmp_path):
    path = word_level_tokenizer(tmp_path / "big.json", 70_000)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        (root / f"d{i}.txt").write_text(f"w{69_990 + i} w{i} w65536")
    corpus = prepare(str(root), fractions=(0.5, 0.25, 0.25), tokenizer=f"hf:{path}", progress=False)
    tokenizer = corpus.tokenizer
    assert tokenizer.vocab_size == 70_001 and tokenizer.eod == 70_000  # <|eod|> added after the words
    assert corpus.manifest["tokenizer"]["dtype"] == "uint32" and corpus.manifest["tokenizer"]["vocab_size"] == 70_001
    ids = np.concatenate([corpus.split(s).tokens for s in SPLITS if corpus.manifest["splits"][s]["documents"]])
    assert ids.dtype == np.uint32 and ids.max() == 70_000 and 65_536 in ids and 69_990 in ids
    first = corpus.split("train")
    assert first.eod == 70_000 and first.tokens[first.doc_starts[1] - 1] == 70_000


def test_bpe_corpus_keeps_its_tokenizer_and_reuses_the_cache(tmp_path, cache):
    root = write_corpus(tmp_path / "corpus")
    corpus = prepare(str(root), fractions=(0.6, 0.2, 0.2), tokenizer="bpe:300", progress=False)
    assert corpus.rebuilt and (corpus.path / TOKENIZER_FILE).is_file()
    described = corpus.manifest["tokenizer"]
    assert described["kind"] == "bpe" and described["sha256"] == corpus.tokenizer.sha256
    assert list((cache / "tokenizers").glob("bpe-300-*.json"))  # trained once, kept for the next build
    byte_corpus = prepare(str(root), fractions=(0.6, 0.2, 0.2), progress=False)
    assert byte_corpus.path != corpus.path and byte_corpus.manifest["tokenizer"] == ByteTokenizer().describe()
    again = prepare(str(root), fractions=(0.6, 0.2, 0.2), tokenizer="bpe:300", progress=False)
    assert not again.rebuilt and again.path == corpus.path and again.manifest["tokenizer"] == described
    # the run's tokenizer object finds the same cache (eval on the training data rebuilds nothing)
    assert not prepare(str(root), fractions=(0.6, 0.2, 0.2), tokenizer=corpus.tokenizer, progress=False).rebuilt
    for name in SPLITS:
        split, info = corpus.split(name), corpus.manifest["splits"][name]
        texts = corpus.tokenizer.decode(split.tokens).split("<|eod|>")[:-1]
        assert len(texts) == info["documents"] and sum(len(t.encode()) for t in texts) == info["bytes"]
        assert info["scored_bytes"] == info["bytes"] + info["documents"]  # each EOD counts one byte
        assert info["tokens"] < info["scored_bytes"]
        assert split.byte_lengths is not None and int(split.byte_lengths[split.tokens].sum()) == info["scored_bytes"]


@pytest.mark.parametrize("spec,message", [
    ("bpe:100", "N >= 257"), ("bpe:lots", "N >= 257"), ("wordpiece", "unknown --tokenizer"), ("hf:", "unknown"),
])
def test_bad_tokenizer_specs_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


def test_hf_tokenizer_file_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read the tokenizer"):
        make_tokenizer(f"hf:{tmp_path / 'none.json'}")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(DataError, match="not a tokenizer.json"):
        make_tokenizer(f"hf:{tmp_path / 'bad.json'}")
