"""Every bad input raises DataError with a clear one-line message."""

import bz2
import zipfile

import numpy as np
import pytest

from memlm.data import DataError, RandomWindows, Streams, TokenSplit, prepare


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def two_member_enwik8(tmp):
    with zipfile.ZipFile(tmp / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", b"a" * 100)
        zf.writestr("extra", b"b")
    return str(tmp / "enwik8.zip")


def bad_crc_zip(tmp):
    path = tmp / "code.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", b"hello world, a stored member")
    data = path.read_bytes().replace(b"hello world", b"HELLO WORLD")  # payload no longer matches its CRC
    return write(path, data)


def empty_dir(tmp):
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def empty_and_binary(tmp):
    write(tmp / "d" / "a.txt", b"")
    write(tmp / "d" / "b.bin", b"\x00\x01")
    return str(tmp / "d")


BAD_SOURCES = {
    "missing path": (lambda tmp: str(tmp / "nope.txt"), "not found"),
    "empty directory": (empty_dir, "empty corpus"),
    "only empty and binary files": (empty_and_binary, "empty corpus"),
    "empty text file": (lambda tmp: write(tmp / "e.txt", b""), "empty corpus"),
    "corrupt gz": (lambda tmp: write(tmp / "x.gz", b"not gzip at all"), "corrupt"),
    "truncated bz2": (lambda tmp: write(tmp / "x.bz2", bz2.compress(b"x" * 1000)[:-10]), "corrupt"),
    "corrupt xz": (lambda tmp: write(tmp / "x.xz", b"\xfd7zXZ\x00garbage"), "corrupt"),
    "corrupt zip": (lambda tmp: write(tmp / "x.zip", b"PK\x03\x04 broken"), "corrupt"),
    "zip member with bad crc": (bad_crc_zip, "corrupt"),
    "corrupt enwik8": (lambda tmp: write(tmp / "enwik8.zip", b"junk"), "corrupt"),
    "enwik8 with two members": (two_member_enwik8, "exactly one file"),
    "tar archive": (lambda tmp: write(tmp / "x.tar.gz", b"whatever"), "tar archives are not supported"),
    "no source": (lambda tmp: " , ", "no data source"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources(tmp_path, case):
    make, message = BAD_SOURCES[case]
    with pytest.raises(DataError, match=message) as info:
        prepare(make(tmp_path), fractions=(0.5, 0.25, 0.25))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.9, 0.2, 0.1), (1.2, -0.1, -0.1), ("a", 0, 0), (float("nan"), 0, 1)])
def test_bad_fractions(tmp_path, fractions):
    with pytest.raises(DataError, match="fractions"):
        prepare(write(tmp_path / "a.txt", b"text"), fractions=fractions)


def test_split_without_documents_is_named(tmp_path):
    corpus = prepare(write(tmp_path / "only.txt", b"one document"), fractions=(0.98, 0.01, 0.01))
    empty = [s for s, info in corpus.manifest["splits"].items() if info["documents"] == 0]
    assert len(empty) == 2  # one document lands in exactly one split
    for name in empty:
        with pytest.raises(DataError, match=rf"split '{name}' has no documents \(the corpus has 1 documents.*fraction"):
            corpus.split(name)


@pytest.mark.parametrize("name", ["valid", "dev", "", "TRAIN"])
def test_unknown_split_name(tmp_path, name):
    corpus = prepare(write(tmp_path / "a.txt", b"text"), fractions=(1, 0, 0))
    with pytest.raises(DataError, match="unknown split.*train, validation, test"):
        corpus.split(name)


SHORT = TokenSplit("validation", np.arange(20, dtype=np.uint16), np.array([0]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RandomWindows(SHORT, 2, 20), "split 'validation' has 20 tokens, fewer than one window"),
        (lambda: Streams(SHORT, 2, 11), "split 'validation' has 20 tokens, too few for 2 streams"),
        (lambda: Streams(SHORT, 3, 4, world_size=2), "too few for 6 streams of seq_len 4 \\(needs 24\\)"),
        (lambda: Streams(TokenSplit("test", np.zeros(0, np.uint16), np.zeros(0, np.int64)), 1, 1, wrap=False), "split 'test' has 0 tokens"),
        (lambda: RandomWindows(SHORT, 2, 4, rank=2, world_size=2), "rank must be"),
        (lambda: Streams(SHORT, 0, 4), "batch_size and seq_len"),
    ],
)
def test_bad_loader_settings(make, message):
    with pytest.raises(DataError, match=message):
        make()


def test_short_split_still_fits_an_unwrapped_pass():
    assert sum(s.valid.sum().item() for s in Streams(SHORT, 8, 16, wrap=False)) == 20


def test_data_error_is_an_exception():
    assert issubclass(DataError, Exception)


def test_unwritable_cache_directory(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(DataError, match="cannot write the cache directory"):
        prepare(write(tmp_path / "a.txt", b"text"), cache_dir=blocker)


@pytest.mark.parametrize("suffix", [".tokens", ".docs.npy"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_file_is_an_error_naming_it(tmp_path, suffix, damage):
    """A flip that keeps every id in the vocabulary would otherwise train silently on wrong data."""
    for i in range(6):
        write(tmp_path / "docs" / f"{i}.txt", b"some text to learn " * 20)
    corpus = prepare(str(tmp_path / "docs"), fractions=(1, 0, 0))
    assert len(corpus.split("train")) == 6 * (20 * 19 + 1)
    file = corpus.path / f"train{suffix}"
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[-4] ^= 0x01  # a neighbouring byte value: still inside the vocabulary
    else:
        del data[-2:]
    file.write_bytes(bytes(data))
    if damage == "truncate" and suffix == ".tokens":  # a size that disagrees with the manifest: rebuilt
        again = prepare(str(tmp_path / "docs"), fractions=(1, 0, 0))
        assert again.rebuilt and len(again.split("train")) == 6 * (20 * 19 + 1)
        return
    with pytest.raises(DataError, match=rf"the cached corpus file {file} is corrupt .*delete {corpus.path} to rebuild"):
        prepare(str(tmp_path / "docs"), fractions=(1, 0, 0)).split("train")


def test_an_edit_that_keeps_size_and_mtime_is_seen_with_verify(tmp_path):
    import os

    for i in range(4):
        write(tmp_path / "docs" / f"{i}.txt", b"original text " * 10)
    spec = str(tmp_path / "docs")
    first = prepare(spec, fractions=(1, 0, 0))
    edited = tmp_path / "docs" / "2.txt"
    stat = edited.stat()
    edited.write_bytes(b"ORIGINAL TEXT " * 10)  # same size
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    stale = prepare(spec, fractions=(1, 0, 0))
    assert not stale.rebuilt and stale.manifest["splits"] == first.manifest["splits"]  # the cheap check misses it
    fresh = prepare(spec, fractions=(1, 0, 0), verify=True)
    assert fresh.rebuilt and fresh.manifest["splits"]["train"]["sha1"] != first.manifest["splits"]["train"]["sha1"]
    assert b"ORIGINAL" in bytes(fresh.split("train").tokens.astype("u1"))
    assert not prepare(spec, fractions=(1, 0, 0), verify=True).rebuilt  # unchanged contents: reused
