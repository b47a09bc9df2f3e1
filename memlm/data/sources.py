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
- any other file: one document, its raw bytes.

A document is named by its path relative to its source (a lone file by its base name);
the name decides its split (`SitePackages` names a file by its path relative to its root,
so the same file gets the same split on every machine). Each source yields its documents
sorted by name, so the result never depends on file-system listing order.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.metadata
import lzma
import os
import platform
import re
import site
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


SITE_PACKAGES_CODE = (".py",)
SITE_PACKAGES_TEXT = (".txt", ".rst", ".md")
SITE_PACKAGES_DIRS = ("site-packages", "dist-packages")
"""Directories never walked into from another root: each is a root of its own, or another
interpreter's (a virtual environment's base installation keeps its own under the stdlib)."""
SITE_PACKAGES_OPTIONS = ("holdout",)
KEYWORDS = ("stdlib", "stdlib-long", "site-packages", "site-packages-text")
"""The data specs that name a built-in corpus rather than a path."""


def site_packages_roots() -> list[tuple[str, Path]]:
    """(role, directory) of each tree the ``site-packages`` sources read: the running interpreter's
    standard library, its purelib and platlib directories (``sysconfig.get_paths()``) and the user
    site-packages where it exists and the interpreter uses it (not in a virtual environment).
    Missing directories are left out, and a directory listed twice (purelib is usually platlib)
    keeps its first role."""
    paths = sysconfig.get_paths()
    candidates = [("stdlib", paths["stdlib"]), ("purelib", paths["purelib"]), ("platlib", paths["platlib"])]
    if site.ENABLE_USER_SITE:
        candidates.append(("user", site.getusersitepackages()))
    roots: list[tuple[str, Path]] = []
    for role, directory in candidates:
        path = Path(directory).resolve()
        if path.is_dir() and all(path != seen for _, seen in roots):
            roots.append((role, path))
    return roots


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: runs of -, _ and . as one -, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _package(name: str) -> str:
    """The top-level package of a file named by its path relative to its root: its first
    directory, or for a file at the top its name without the suffix (``six.py``: ``six``)."""
    head, slash, _ = name.partition("/")
    return head if slash else Path(name).stem


def _metadata_dirs(path: Path) -> list[str]:
    """The names of the distributions' metadata directories at the top of `path` (none if it is gone)."""
    try:
        with os.scandir(path) as entries:
            return [entry.name for entry in entries if entry.name.endswith((".dist-info", ".egg-info"))]
    except OSError:
        return []


class SitePackages(Source):
    """Every file with one of `suffixes` under the trees of `site_packages_roots`, each kept once.

    A file is named by its path relative to its root, so its split (a hash of the name) is the same
    on every machine, whatever the root's absolute path or role. Hidden files and directories,
    ``__pycache__``, and any ``site-packages`` / ``dist-packages`` directory or other root met inside
    a root are skipped. Files are read in (name, root) order; unreadable files, binary files (a NUL
    byte), empty files and files whose SHA-256 an earlier file had are skipped, so the first name in
    sorted order keeps duplicated contents. Each document carries its top-level package (`_package`).

    `holdout`: top-level package names (the first directory of a file's name, or a top-level
    module's name) or distribution names (then every top-level name in the distribution's RECORD,
    its ``.dist-info`` included); their files all go to the test split, none to train or validation.

    `inventory` (written into the cache manifest) records the roots, the files and bytes kept,
    what was skipped, the held-out packages, and every distribution installed in the roots
    (``importlib.metadata``) with its version.
    """

    kind = "site-packages"

    def __init__(self, roots: Sequence[tuple[str, Path]], suffixes: Sequence[str] = SITE_PACKAGES_CODE,
                 holdout: Sequence[str] = (), label: str = "site-packages"):
        if not roots:
            raise DataError("site-packages: no standard library or site-packages directory found")
        super().__init__(Path(roots[0][1]))
        self.roots = [(role, Path(path)) for role, path in roots]
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.holdout = tuple(sorted(set(holdout)))
        self.label = label
        self._stats: dict | None = None  # of the last complete pass over `documents`

    @property
    def key(self) -> dict:
        return {"kind": self.kind, "roots": [[role, str(path)] for role, path in self.roots],
                "suffixes": list(self.suffixes), "holdout": list(self.holdout)}

    def __str__(self) -> str:
        return f"{self.label} ({', '.join(str(path) for _, path in self.roots)})"

    def _walk(self, index: int) -> list[str]:
        """The relative names of the candidate files under root `index`."""
        root = self.roots[index][1]
        others = {path for i, (_, path) in enumerate(self.roots) if i != index}
        names = []
        for directory, dirs, files in os.walk(root):
            here = Path(directory)
            rel = here.relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                       and d not in SITE_PACKAGES_DIRS and here / d not in others]
            names += [prefix + f for f in files if not f.startswith(".") and f.lower().endswith(self.suffixes)]
        return names

    @cached_property
    def candidates(self) -> list[tuple[str, int]]:
        """(relative name, root index) of every file that passes the name filters, sorted."""
        return sorted((name, index) for index in range(len(self.roots)) for name in self._walk(index))

    def count(self) -> int:
        return len(self.candidates)

    @cached_property
    def distributions(self) -> list[importlib.metadata.Distribution]:
        """The distributions installed in the roots (their ``.dist-info`` / ``.egg-info``), by name."""
        found = importlib.metadata.distributions(path=[str(path) for _, path in self.roots])
        named = [d for d in found if d.metadata is not None and d.metadata["Name"]]
        return sorted(named, key=lambda d: (_normalize(d.metadata["Name"]), d.version or ""))

    @cached_property
    def held(self) -> frozenset[str]:
        """The top-level names whose files go to the test split: the `holdout` names themselves and
        the top-level names of the distributions they name. A name that matches no candidate file
        and no installed distribution is an error (a typo would hold out nothing)."""
        if not self.holdout:
            return frozenset()
        packages = {_package(name) for name, _ in self.candidates}
        held = set()
        for name in self.holdout:
            tops = set()
            for dist in self.distributions:
                if _normalize(dist.metadata["Name"]) == _normalize(name):
                    tops |= {f.parts[0] if len(f.parts) > 1 else Path(f.parts[0]).stem
                             for f in dist.files or () if f.parts and f.parts[0] not in ("..", "__pycache__")}
            if name not in packages and not tops:
                raise DataError(f"{self.label}: held-out package {name!r} is neither a top-level package of "
                                f"the corpus nor an installed distribution")
            held |= tops | ({name} & packages)
        return frozenset(held)

    def stamp(self) -> list:
        """(root, name, size, mtime) of every candidate file, after the names of the roots' metadata
        directories (they carry the distributions' versions). Also checks the held-out names."""
        _ = self.held
        stamps: list = [["metadata", sorted(name for _, path in self.roots for name in _metadata_dirs(path))]]
        for name, index in self.candidates:
            try:
                st = (self.roots[index][1] / name).stat()
                stamps.append([index, name, st.st_size, st.st_mtime_ns])
            except OSError:  # a dangling link: skipped when read
                stamps.append([index, name, -1, -1])
        return stamps

    def documents(self) -> Iterator[Document]:
        held = self.held
        seen: set[bytes] = set()
        stats = {"files": 0, "bytes": 0, "held_out_files": 0, "held_out_bytes": 0,
                 "skipped": {"duplicate": 0, "binary": 0, "empty": 0, "unreadable": 0}}
        for name, index in self.candidates:
            try:
                data = (self.roots[index][1] / name).read_bytes()
            except OSError:
                stats["skipped"]["unreadable"] += 1
                continue
            reason = "empty" if not data else "binary" if not _is_text(data) else None
            if reason is None:
                digest = hashlib.sha256(data).digest()
                reason = "duplicate" if digest in seen else None
                seen.add(digest)
            if reason is not None:
                stats["skipped"][reason] += 1
                continue
            package = _package(name)
            stats["files"] += 1
            stats["bytes"] += len(data)
            if package in held:
                stats["held_out_files"] += 1
                stats["held_out_bytes"] += len(data)
            yield Document(name, "test" if package in held else None, data, package)
        self._stats = stats

    def inventory(self) -> dict:
        """Roots, files and bytes kept, files skipped (by reason), held-out packages and the
        installed distributions with their versions: what a build of this source trained on."""
        if self._stats is None:
            for _ in self.documents():
                pass
        stats = dict(self._stats)
        holdout = {"names": list(self.holdout), "packages": sorted(self.held),
                   "files": stats.pop("held_out_files"), "bytes": stats.pop("held_out_bytes")}
        return {
            "kind": self.kind,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "roots": [{"role": role, "path": str(path)} for role, path in self.roots],
            "suffixes": list(self.suffixes),
            **stats,
            "holdout": holdout,
            "distributions": [{"name": d.metadata["Name"], "version": d.version} for d in self.distributions],
        }


def site_packages_source(text: bool = False, holdout: Sequence[str] = ()) -> SitePackages:
    """``site-packages`` (Python files) or, with `text`, ``site-packages-text`` (``.txt``, ``.rst``
    and ``.md`` files) over `site_packages_roots`, holding out the packages named in `holdout`."""
    if text:
        return SitePackages(site_packages_roots(), SITE_PACKAGES_TEXT, holdout, "site-packages-text")
    return SitePackages(site_packages_roots(), SITE_PACKAGES_CODE, holdout, "site-packages")


def _site_packages_spec(spec: str) -> SitePackages:
    """A ``site-packages[-text][:holdout=a+b]`` spec: options follow the name after colons."""
    name, *options = spec.split(":")
    holdout: list[str] = []
    for option in options:
        key, eq, value = option.partition("=")
        if key not in SITE_PACKAGES_OPTIONS or not eq:
            raise DataError(f"unknown option {option!r} in {spec!r}: {name} takes "
                            f"{', '.join(o + '=...' for o in SITE_PACKAGES_OPTIONS)}")
        names = [v.strip() for v in value.split("+")]
        if not all(names):
            raise DataError(f"empty package name in {spec!r}: write {name}:holdout=numpy+torch")
        holdout += names
    return site_packages_source(text=name == "site-packages-text", holdout=holdout)


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
    if spec.partition(":")[0] in ("site-packages", "site-packages-text"):
        return _site_packages_spec(spec)
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data source not found: {spec} (expected 'stdlib', 'stdlib-long', 'site-packages', "
                        f"'site-packages-text', a file, a directory or an archive)")
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
