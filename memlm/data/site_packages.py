"""The ``site-packages`` corpus: every Python source file (or, for ``site-packages-text``, every
``.txt`` / ``.rst`` / ``.md`` file) of the running interpreter's standard library and
site-packages, deduplicated by content, each file named by its path relative to its root so that
it falls in the same split on every machine; ``:holdout=a+b`` puts whole packages into the test
split. See memlm.data.sources for the other sources and the spec syntax.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import site
import sysconfig
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

from .errors import DataError
from .sources import Document, Source, _is_text

SITE_PACKAGES_CODE = (".py",)
SITE_PACKAGES_TEXT = (".txt", ".rst", ".md")
SITE_PACKAGES_DIRS = ("site-packages", "dist-packages")
"""Directories never walked into from another root: each is a root of its own, or another
interpreter's (a virtual environment's base installation keeps its own under the stdlib)."""
SITE_PACKAGES_OPTIONS = ("holdout",)


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


def site_packages_spec(spec: str) -> SitePackages:
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
