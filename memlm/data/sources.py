"""Corpus sources: where documents come from.

A `data` spec is a string or a list of strings; a string may hold several sources
separated by commas. Each source is one of

- ``"stdlib"``: every ``*.py`` file of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``, tests included, site-packages excluded);
- ``"stdlib-long"``: the same files joined into long documents: each directory's files, in
  name order, each after a ``# file: <path>`` line, concatenated into documents of at most
  64 KiB (a larger file stays one document). Related code in documents of up to 128 segments
  of 512 bytes, for measuring memory that reaches far back (`Joined`);
- ``"site-packages"``: every ``*.py`` file of the standard library and of the interpreter's
  site-packages / dist-packages directories (`site_packages_roots`), deduplicated by content
  (`SitePackages`); ``"site-packages-text"``: their ``.txt`` / ``.rst`` / ``.md`` files. Option
  ``:holdout=numpy+torch`` (names joined by ``+``: a comma separates sources) puts every file of
  those top-level packages, or of those distributions, into the test split;
- a directory: every file, recursively, whose relative path matches an `include` glob and
  no `exclude` glob (an excluded directory is skipped whole); files holding a NUL byte are
  binary and skipped;
- a ``.gz`` / ``.bz2`` / ``.xz`` file: one document, decompressed (alone in a spec, a
  one-document source is cut by byte offsets into the three splits: see `cache.cut_by_offsets`);
- a ``.zip`` file: treated like a directory, each member a document; except a zip whose
  name starts with ``enwik8``: its one member is cut by byte offsets into train
  (the first 90%), validation (the next 5%) and test (the last 5%). For the real
  100,000,000-byte enwik8 that is exactly the standard 90M / 5M / 5M split;
- any other file: one document, its raw bytes;
- ``"hf:PATH"``: text, JSON lines or Parquet files read (streamed) through the Hugging Face
  `datasets` library, a document per file or row (`memlm.data.hf_datasets`).

A document is named by its path relative to its source (a lone file by its base name);
the name decides its split (`SitePackages` names a file by its path relative to its root,
so the same file gets the same split on every machine). Each source yields its documents
sorted by name, so the result never depends on file-system listing order.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import sysconfig
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path

from .errors import DataError

DEFAULT_INCLUDE = ("*",)
DEFAULT_EXCLUDE = (".*", "*/.*")  # hidden files and directories (.git, .venv, ...)
STDLIB_INCLUDE = ("*.py",)
STDLIB_EXCLUDE = ("site-packages", "dist-packages", "__pycache__", "*/__pycache__")
COMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")
ARCHIVE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Document:
    """One document: its name, its split when the source fixes it (else None), its bytes, and the
    top-level package it belongs to where the source knows one (`SitePackages`)."""

    name: str
    split: str | None
    data: bytes | memoryview
    package: str | None = None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _is_text(data: bytes) -> bool:
    return b"\0" not in data


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


class Source:
    """Base of all sources. `key` describes it for the cache key, `stamp` for change detection."""

    kind = "source"

    def __init__(self, path: Path):
        self.path = path
        self.label = path.name  # short name for progress bars

    @property
    def key(self) -> dict:
        """JSON description that identifies the source (independent of its contents)."""
        return {"kind": self.kind, "path": str(self.path)}

    def stamp(self) -> list:
        """Cheap change detector: (name, size, mtime_ns) of every file read."""
        st = self.path.stat()
        return [[self.path.name, st.st_size, st.st_mtime_ns]]

    def count(self) -> int:
        """Number of candidate documents (for progress), before skipping binary or empty ones."""
        return 1

    def inventory(self) -> dict | None:
        """What a build of this source read, for the cache manifest (None: nothing beyond `key`)."""
        return None

    def documents(self) -> Iterator[Document]:
        """The documents, sorted by name, read one at a time."""
        raise NotImplementedError

    def __str__(self) -> str:
        return str(self.path)


class TextFile(Source):
    """A plain file: one document, its raw bytes."""

    kind = "file"

    def documents(self) -> Iterator[Document]:
        yield Document(self.path.name, None, _read(self.path))


class CompressedFile(Source):
    """A .gz, .bz2 or .xz file: one document, named without the compression suffix."""

    kind = "compressed"

    def documents(self) -> Iterator[Document]:
        try:
            with COMPRESSORS[self.path.suffix.lower()](self.path, "rb") as f:
                data = f.read()
        except ARCHIVE_ERRORS as e:
            raise DataError(f"corrupt or unreadable archive {self.path}: {e}") from None
        yield Document(self.path.stem, None, data)


class _Filtered(Source):
    """A source of many files named by relative path, filtered by include/exclude globs.

    Subclasses define `names`: the relative POSIX paths that pass the filters, sorted.
    """

    def __init__(self, path: Path, include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = DEFAULT_EXCLUDE):
        super().__init__(path)
        self.include, self.exclude = tuple(include), tuple(exclude)

    @property
    def key(self) -> dict:
        return {**super().key, "include": list(self.include), "exclude": list(self.exclude)}

    def _keep(self, name: str) -> bool:
        return _matches(name, self.include) and not _matches(name, self.exclude)

    def count(self) -> int:
        return len(self.names)


class Directory(_Filtered):
    """Every text file under a directory that passes the include/exclude globs."""

    kind = "directory"

    @cached_property
    def names(self) -> list[str]:
        names = []
        for root, dirs, files in os.walk(self.path):
            rel = Path(root).relative_to(self.path).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirs[:] = [d for d in dirs if not _matches(prefix + d, self.exclude)]
            names += [prefix + f for f in files if self._keep(prefix + f)]
        return sorted(names)

    def stamp(self) -> list:
        stamps = []
        for name in self.names:
            st = (self.path / name).stat()
            stamps.append([name, st.st_size, st.st_mtime_ns])
        return stamps

    def documents(self) -> Iterator[Document]:
        for name in self.names:
            data = _read(self.path / name)
            if _is_text(data):
                yield Document(name, None, data)


class ZipArchive(_Filtered):
    """A .zip file: each text member that passes the include/exclude globs is a document."""

    kind = "zip"

    @cached_property
    def names(self) -> list[str]:
        with self._open() as zf:
            return sorted(i.filename for i in zf.infolist() if not i.is_dir() and self._keep(i.filename))

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except ARCHIVE_ERRORS as e:
            raise DataError(f"corrupt or unreadable zip archive {self.path}: {e}") from None

    def documents(self) -> Iterator[Document]:
        with self._open() as zf:
            for name in self.names:
                try:
                    data = zf.read(name)
                except ARCHIVE_ERRORS as e:
                    raise DataError(f"corrupt or unreadable member {name!r} of {self.path}: {e}") from None
                if _is_text(data):
                    yield Document(name, None, data)


class Enwik8(Source):
    """enwik8.zip: its single member split by byte offsets into 90% / 5% / 5%."""

    kind = "enwik8"

    def count(self) -> int:
        return 3

    def documents(self) -> Iterator[Document]:
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = [i.filename for i in zf.infolist() if not i.is_dir()]
                if len(members) != 1:
                    raise DataError(f"{self.path} should hold exactly one file (enwik8), found {len(members)}")
                data = memoryview(zf.read(members[0]))
        except ARCHIVE_ERRORS as e:
            raise DataError(f"corrupt or unreadable zip archive {self.path}: {e}") from None
        train_end, validation_end = enwik8_offsets(len(data))
        yield Document(f"{members[0]}[train]", "train", data[:train_end])
        yield Document(f"{members[0]}[validation]", "validation", data[train_end:validation_end])
        yield Document(f"{members[0]}[test]", "test", data[validation_end:])


class Joined(Source):
    """A directory's files joined into long documents: the files of each sub-directory, in name
    order, each after a ``# file: <relative path>`` line, concatenated into documents of at most
    `max_bytes` (a file larger than that is a document alone). Documents are named
    ``<directory>#<part>`` (the top directory is ``""``), which sorts as they are yielded."""

    kind = "joined"

    def __init__(self, inner: Directory, max_bytes: int):
        if max_bytes < 1:
            raise DataError(f"joined documents need a positive size, got {max_bytes}")
        super().__init__(inner.path)
        self.inner, self.max_bytes = inner, max_bytes
        self.label = f"{inner.label}-long"

    @property
    def key(self) -> dict:
        return {"kind": self.kind, "max_bytes": self.max_bytes, "inner": self.inner.key}

    def stamp(self) -> list:
        return self.inner.stamp()

    def count(self) -> int:
        return self.inner.count()

    def documents(self) -> Iterator[Document]:
        by_directory: dict[str, list[str]] = {}
        for name in self.inner.names:
            by_directory.setdefault(name.rpartition("/")[0], []).append(name)
        for directory in sorted(by_directory):
            part, pieces, size = 0, [], 0
            for name in by_directory[directory]:
                data = _read(self.inner.path / name)
                if not _is_text(data) or not data:
                    continue
                piece = f"# file: {name}\n".encode() + data + (b"" if data.endswith(b"\n") else b"\n")
                if pieces and size + len(piece) > self.max_bytes:
                    yield Document(f"{directory}#{part:04d}", None, b"".join(pieces))
                    part, pieces, size = part + 1, [], 0
                pieces.append(piece)
                size += len(piece)
            if pieces:
                yield Document(f"{directory}#{part:04d}", None, b"".join(pieces))


STDLIB_LONG_BYTES = 65536
"""Size limit of a stdlib-long document: 128 segments of 512 bytes."""


def enwik8_offsets(size: int) -> tuple[int, int]:
    """(end of train, end of validation) for an enwik8 file of `size` bytes: 90% / 5% / 5%.

    Validation and test hold size // 20 bytes each, the last ones; train holds the rest.
    For the real 100,000,000 bytes: (90_000_000, 95_000_000).
    """
    held_out = size // 20
    return size - 2 * held_out, size - held_out


def stdlib_source() -> Directory:
    """The running interpreter's standard library source: every ``*.py`` file."""
    source = Directory(Path(sysconfig.get_paths()["stdlib"]).resolve(), STDLIB_INCLUDE, STDLIB_EXCLUDE)
    source.label = "stdlib"
    return source


KEYWORDS = ("stdlib", "stdlib-long", "site-packages", "site-packages-text")
"""The data specs that name a built-in corpus rather than a path."""


def parse_spec(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[Source]:
    """Sources of a data spec: "stdlib", "site-packages", paths, comma-separated strings or a list of them.

    `include` / `exclude` apply to directories and plain zip archives (a single string is one pattern).
    """
    include = (include,) if isinstance(include, str) else tuple(include)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    parts = []
    for item in items:
        if isinstance(item, str) and "," in item and not Path(item).expanduser().exists():
            parts += [p.strip() for p in item.split(",")]  # a list of sources; an existing path stays whole
        else:
            parts.append(os.fspath(item))
    parts = [p for p in parts if p]
    for part, after in zip(parts, parts[1:]):
        if (part.startswith(("site-packages:", "site-packages-text:")) and not Path(after).expanduser().exists()
                and after.partition(":")[0] not in KEYWORDS):
            raise DataError(f"{after!r} is not a data source: held-out packages are joined by '+' "
                            f"(a comma separates sources), e.g. site-packages:holdout=numpy+torch")
    if not parts:
        raise DataError("no data source given: use 'stdlib', 'site-packages', a file, a directory or an archive")
    return [_source(p, include, exclude) for p in parts]


def _source(spec: str, include: Sequence[str], exclude: Sequence[str]) -> Source:
    if spec == "stdlib":
        return stdlib_source()
    if spec == "stdlib-long":
        return Joined(stdlib_source(), STDLIB_LONG_BYTES)
    if spec.startswith("hf:"):
        from .hf_datasets import HFFiles  # imports `datasets` only when read
        return HFFiles(spec.removeprefix("hf:"))
    if spec.partition(":")[0] in ("site-packages", "site-packages-text"):
        from .site_packages import site_packages_spec  # it builds on this module's Source
        return site_packages_spec(spec)
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data source not found: {spec} (expected 'stdlib', 'stdlib-long', 'site-packages', "
                        f"'site-packages-text', hf:PATH, a file, a directory or an archive)")
    if path.is_dir():
        return Directory(path, include, exclude)
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        raise DataError(f"tar archives are not supported: unpack {spec} and point the data spec at the directory")
    if path.suffix.lower() in COMPRESSORS:
        return CompressedFile(path)
    if name.endswith(".zip"):
        return Enwik8(path) if name.startswith("enwik8") else ZipArchive(path, include, exclude)
    return TextFile(path)
