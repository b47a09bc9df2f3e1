"""Corpus sources: directories, archives of each kind, enwik8 offsets, the stdlib listing."""

import bz2
import gzip
import lzma
import zipfile

import numpy as np
import pytest

from memlm.data import EOD, prepare
from memlm.data.errors import DataError
from memlm.data.sources import (STDLIB_LONG_BYTES, CompressedFile, Directory, Enwik8, Joined, TextFile, ZipArchive,
                                enwik8_offsets, parse_spec, stdlib_source)

FRACTIONS = (0.5, 0.25, 0.25)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))


def docs(source):
    return {d.name: bytes(d.data) for d in source.documents()}


def test_directory_filters_hidden_binary_and_sorts(tmp_path):
    root = tmp_path / "corpus"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "pkg" / "sub" / "b.py").write_bytes(b"print(1)\n")
    (root / "a.txt").write_bytes(b"alpha")
    (root / "pkg" / "z.md").write_bytes(b"zed")
    (root / ".git" / "config").write_bytes(b"hidden")
    (root / "pkg" / ".env").write_bytes(b"hidden")
    (root / "blob.bin").write_bytes(b"ab\x00cd")
    source = Directory(root)
    assert source.names == ["a.txt", "blob.bin", "pkg/sub/b.py", "pkg/z.md"]
    assert list(docs(source)) == ["a.txt", "pkg/sub/b.py", "pkg/z.md"]  # NUL: binary, skipped
    assert docs(source)["pkg/sub/b.py"] == b"print(1)\n"
    assert Directory(root, include=["*.py"]).names == ["pkg/sub/b.py"]
    # exclude replaces the default (hidden files); an excluded directory is skipped whole
    assert Directory(root, exclude=["pkg"]).names == [".git/config", "a.txt", "blob.bin"]
    assert Directory(root, include=["*"], exclude=[]).count() == 6


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_file_round_trips(tmp_path, suffix, opener):
    payload = bytes(range(256)) * 40 + "ünïcode".encode()
    path = tmp_path / f"book.txt{suffix}"
    with opener(path, "wb") as f:
        f.write(payload)
    (source,) = parse_spec(str(path))
    assert isinstance(source, CompressedFile)
    assert docs(source) == {"book.txt": payload}
    corpus = prepare(str(path), fractions=FRACTIONS)  # alone, it is cut by offsets into the splits
    pieces = [corpus.split(name).tokens.tolist() for name in ("train", "validation", "test")]
    assert all(piece[-1] == EOD and corpus.split(name).doc_starts.tolist() == [0]
               for piece, name in zip(pieces, ("train", "validation", "test")))
    assert sum((piece[:-1] for piece in pieces), []) == list(payload)


def test_zip_members_are_documents(tmp_path):
    path = tmp_path / "code.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("src/", b"")
        zf.writestr("src/b.py", b"x = 1\n" * 100)
        zf.writestr("a.txt", "tëxt".encode())
        zf.writestr("img.png", b"\x89PNG\x00\x00")
        zf.writestr(".DS_Store", b"junk")
    (source,) = parse_spec(str(path))
    assert isinstance(source, ZipArchive)
    assert docs(source) == {"a.txt": "tëxt".encode(), "src/b.py": b"x = 1\n" * 100}


def test_enwik8_offsets():
    assert enwik8_offsets(100_000_000) == (90_000_000, 95_000_000)
    assert enwik8_offsets(1000) == (900, 950)
    assert enwik8_offsets(1019) == (919, 969)  # held-out parts are size // 20 bytes each


def test_enwik8_zip_split_by_offsets(tmp_path):
    data = np.random.default_rng(0).integers(32, 127, size=2000, dtype=np.uint8).tobytes()
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    (source,) = parse_spec(str(path))
    assert isinstance(source, Enwik8)
    corpus = prepare(str(path))  # the default fractions do not apply to enwik8
    expected = {"train": data[:1800], "validation": data[1800:1900], "test": data[1900:]}
    for name, part in expected.items():
        split = corpus.split(name)
        assert split.tokens.tolist() == list(part) + [EOD]
        assert corpus.manifest["splits"][name]["bytes"] == len(part)


def test_spec_forms_agree(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f.txt").write_text("x")
    joined = parse_spec(f"{tmp_path / 'f.txt'}, {tmp_path / 'd'}")
    listed = parse_spec([str(tmp_path / "f.txt"), tmp_path / "d"])
    assert [s.key for s in joined] == [s.key for s in listed]
    assert [type(s) for s in joined] == [TextFile, Directory]
    assert parse_spec("stdlib")[0].key == stdlib_source().key
    (only_py,) = parse_spec(str(tmp_path / "d"), include="*.py")  # a string is one pattern, not its characters
    assert only_py.include == ("*.py",)


def test_stdlib_lists_real_python_files():
    source = stdlib_source()
    names = source.names  # listing only, nothing is tokenised
    assert len(names) > 500
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(names)
    assert all(n.endswith(".py") for n in names)
    assert not any(n.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in n for n in names)
    assert (source.path / "os.py").read_bytes().startswith(b'r"""')


def test_joined_documents_group_a_directory_in_name_order_up_to_a_size(tmp_path):
    root = tmp_path / "corpus"
    (root / "pkg" / "sub").mkdir(parents=True)
    files = {"top.py": b"t = 1\n", "pkg/a.py": b"a" * 30 + b"\n", "pkg/b.py": b"b" * 20,  # no final newline
             "pkg/c.py": b"c" * 90 + b"\n", "pkg/d.py": b"d\n", "pkg/sub/e.py": b"e\n", "pkg/z.bin": b"\x00"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    joined = Joined(Directory(root), max_bytes=80)
    got = docs(joined)
    piece = {name: f"# file: {name}\n".encode() + data + (b"" if data.endswith(b"\n") else b"\n")
             for name, data in files.items()}
    assert got == {  # a.py (48 bytes) + b.py (36) > 80: b.py starts part 1; c.py (107) alone; d.py after it
        "#0000": piece["top.py"],
        "pkg#0000": piece["pkg/a.py"],
        "pkg#0001": piece["pkg/b.py"],
        "pkg#0002": piece["pkg/c.py"],
        "pkg#0003": piece["pkg/d.py"],
        "pkg/sub#0000": piece["pkg/sub/e.py"],
    }
    assert list(got) == sorted(got)  # yielded in name order, as every source yields
    roomy = docs(Joined(Directory(root), max_bytes=10_000))
    assert roomy["pkg#0000"] == b"".join(piece[f"pkg/{n}.py"] for n in "abcd")  # z.bin: binary, skipped
    assert Joined(Directory(root), 80).key != Joined(Directory(root), 81).key  # the size is part of the cache key
    with pytest.raises(DataError, match="positive"):
        Joined(Directory(root), 0)


def test_stdlib_long_joins_the_stdlib():
    (source,) = parse_spec("stdlib-long")
    assert isinstance(source, Joined) and source.max_bytes == STDLIB_LONG_BYTES == 128 * 512
    assert source.inner.key == stdlib_source().key and source.stamp() == stdlib_source().stamp()
    first = next(source.documents())  # the top directory's first modules
    assert first.name == "#0000" and first.data.startswith(b"# file: ")
    assert len(first.data) <= STDLIB_LONG_BYTES
