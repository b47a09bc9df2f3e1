"""prepare(): deterministic splits, manifest contents, cache reuse and rebuilds, atomic writes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from memlm.data import EOD, SPLITS, DataError, assign_split, default_cache_dir, prepare
from memlm.data import sources as sources_module

FRACTIONS = (0.6, 0.2, 0.2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def contents(i: int) -> bytes:
    return f"document {i}\n".encode() * (i % 7 + 1)


def make_corpus(root: Path, order=range(40)) -> Path:
    """A directory of 40 small documents, created in the given order."""
    for i in order:
        path = root / f"d{i % 4}" / f"f{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents(i))
    return root


def names_of(i: int) -> str:
    return f"d{i % 4}/f{i:02d}.txt"


def test_split_follows_name_hash_in_name_order(tmp_path):
    corpus = prepare(str(make_corpus(tmp_path / "c")), fractions=FRACTIONS)
    for split_name in SPLITS:
        names = sorted(names_of(i) for i in range(40) if assign_split(names_of(i), FRACTIONS) == split_name)
        by_name = {names_of(i): contents(i) for i in range(40)}
        expected = [t for n in names for t in [*by_name[n], EOD]]
        split = corpus.split(split_name)
        assert split.tokens.tolist() == expected
        lengths = [len(by_name[n]) + 1 for n in names]
        assert split.doc_starts.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        info = corpus.manifest["splits"][split_name]
        assert (info["documents"], info["bytes"], info["tokens"]) == (len(names), sum(lengths) - len(names), sum(lengths))
    assert sum(corpus.manifest["splits"][s]["documents"] for s in SPLITS) == 40


def test_split_independent_of_listing_order(tmp_path, cache):
    a = prepare(str(make_corpus(tmp_path / "a", order=range(40))), fractions=FRACTIONS)
    b = prepare(str(make_corpus(tmp_path / "b", order=reversed(range(40)))), fractions=FRACTIONS)
    assert a.path != b.path  # different sources, different cache entries
    for name in SPLITS:
        assert a.manifest["splits"][name] == b.manifest["splits"][name]
        assert (a.path / f"{name}.tokens").read_bytes() == (b.path / f"{name}.tokens").read_bytes()


def test_assign_split_is_a_fixed_function_of_the_name():
    names = [f"pkg/module_{i}.py" for i in range(5000)]
    first = [assign_split(n, (0.8, 0.1, 0.1)) for n in names]
    assert first == [assign_split(n, (0.8, 0.1, 0.1)) for n in reversed(names)][::-1]
    counts = {s: first.count(s) for s in SPLITS}
    assert abs(counts["train"] - 4000) < 150 and abs(counts["validation"] - 500) < 100
    assert {assign_split(n, (1, 0, 0)) for n in names} == {"train"}
    assert {assign_split(n, (0, 0, 1)) for n in names} == {"test"}


def test_manifest_saved_and_cache_reused(tmp_path, cache):
    root = make_corpus(tmp_path / "c")
    first = prepare(str(root), fractions=FRACTIONS)
    assert first.rebuilt and first.path.parent == cache == default_cache_dir()
    assert json.loads((first.path / "manifest.json").read_text()) == first.manifest
    assert first.manifest["fractions"] == dict(zip(SPLITS, FRACTIONS))
    assert first.manifest["tokenizer"]["vocab_size"] == 257
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = prepare(str(root), fractions=FRACTIONS)
    assert not second.rebuilt
    assert second.path == first.path and second.manifest == first.manifest
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == mtimes
    assert sorted(mtimes) == sorted(["manifest.json"] + [f"{s}.{ext}" for s in SPLITS for ext in ("tokens", "docs.npy")])
    assert prepare(str(root), fractions=FRACTIONS, rebuild=True).rebuilt


def test_other_fractions_or_cache_dir_get_their_own_build(tmp_path):
    root = make_corpus(tmp_path / "c")
    a = prepare(str(root), fractions=FRACTIONS)
    b = prepare(str(root), fractions=(0.5, 0.25, 0.25))
    c = prepare(str(root), cache_dir=tmp_path / "elsewhere", fractions=FRACTIONS)
    assert len({a.path, b.path, c.path}) == 3 and b.rebuilt and c.rebuilt
    assert c.path.parent == tmp_path / "elsewhere"


@pytest.mark.parametrize("change", ["content", "mtime", "new file", "removed file"])
def test_changed_source_is_rebuilt(tmp_path, change):
    root = make_corpus(tmp_path / "c")
    before = prepare(str(root), fractions=FRACTIONS)
    target = root / names_of(3)
    if change == "content":
        target.write_bytes(b"something else entirely\n")
    elif change == "mtime":
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    elif change == "new file":
        (root / "d0" / "new.txt").write_bytes(b"brand new")
    else:
        target.unlink()
    after = prepare(str(root), fractions=FRACTIONS)
    assert after.rebuilt and after.path == before.path
    assert after.manifest["stamp"] != before.manifest["stamp"]
    total = lambda c: sum(c.manifest["splits"][s]["documents"] for s in SPLITS)  # noqa: E731
    assert total(after) - total(before) == {"content": 0, "mtime": 0, "new file": 1, "removed file": -1}[change]
    if change == "content":
        split = after.split(assign_split(names_of(3), FRACTIONS))
        assert b"something else entirely" in split.tokens.astype(np.uint8).tobytes()
    assert not prepare(str(root), fractions=FRACTIONS).rebuilt


def test_truncated_token_file_is_not_trusted(tmp_path):
    root = make_corpus(tmp_path / "c")
    corpus = prepare(str(root), fractions=FRACTIONS)
    tokens = corpus.path / "train.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    again = prepare(str(root), fractions=FRACTIONS)
    assert again.rebuilt
    assert tokens.stat().st_size == 2 * again.manifest["splits"]["train"]["tokens"]


def test_crash_mid_build_leaves_nothing_trusted(tmp_path, monkeypatch):
    root = make_corpus(tmp_path / "c")
    good = prepare(str(root), fractions=FRACTIONS)
    (root / "d1" / "late.txt").write_bytes(b"forces a rebuild")
    real_read = sources_module._read
    calls = []

    def crashing_read(path):
        calls.append(path)
        if len(calls) == 20:
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through
        return real_read(path)

    monkeypatch.setattr(sources_module, "_read", crashing_read)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), fractions=FRACTIONS)
    assert not (good.path / "manifest.json").exists()  # the old manifest went first
    assert not [p for p in good.path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(sources_module, "_read", real_read)
    rebuilt = prepare(str(root), fractions=FRACTIONS)
    assert rebuilt.rebuilt
    assert sum(rebuilt.manifest["splits"][s]["documents"] for s in SPLITS) == 41


def test_several_sources_in_one_corpus(tmp_path):
    root = make_corpus(tmp_path / "c")
    (tmp_path / "extra.txt").write_bytes(b"extra document")
    spec = f"{root},{tmp_path / 'extra.txt'}"
    corpus = prepare(spec, fractions=FRACTIONS)
    assert prepare([str(root), str(tmp_path / "extra.txt")], fractions=FRACTIONS).path == corpus.path
    assert [s["kind"] for s in corpus.manifest["sources"]] == ["directory", "file"]
    assert sum(corpus.manifest["splits"][s]["documents"] for s in SPLITS) == 41
    assert sum(corpus.manifest["splits"][s]["bytes"] for s in SPLITS) == sum(len(contents(i)) for i in range(40)) + 14


@pytest.mark.parametrize("suffix", [".txt", ".gz"])
def test_a_lone_file_is_cut_by_byte_offsets_into_every_split(tmp_path, suffix):
    import gzip

    data = bytes(range(32, 127)) * 100  # 9,500 bytes
    path = tmp_path / f"book{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".gz" else data)
    corpus = prepare(str(path), fractions=(0.8, 0.1, 0.1))
    pieces = {name: np.asarray(corpus.split(name).tokens) for name in SPLITS}
    # each split is one document: its bytes, then EOD
    assert [len(pieces[name]) for name in SPLITS] == [7600 + 1, 950 + 1, 950 + 1]
    assert all(piece[-1] == EOD for piece in pieces.values())
    assert bytes(np.concatenate([pieces[name][:-1] for name in SPLITS]).astype(np.uint8)) == data
    # in a spec with other sources the file stays one document, split by its name's hash
    other = tmp_path / "other.txt"
    other.write_bytes(b"x" * 100)
    mixed = prepare([str(path), str(other)], fractions=(0.8, 0.1, 0.1))
    assert sum(mixed.manifest["splits"][name]["documents"] for name in SPLITS) == 2
