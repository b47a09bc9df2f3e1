"""Prepared corpora: one token file per split, cached on disk and described by a manifest.

Layout of a prepared corpus, ``<cache_dir>/<key>/``::

    manifest.json        sources; inventory: what each source read, where it says (`Source.inventory`:
                         for site-packages the roots, files, bytes, held-out packages and installed
                         distributions with versions); fractions; per split: documents, bytes,
                         tokens, SHA-1 of the contents, BLAKE2b-128 of its two files (checked each
                         time a split is opened: any damage to a token file is an error naming it,
                         never silent data)
    train.tokens         little-endian ids (uint16, uint32 for vocabularies over 65,535 tokens):
                         documents concatenated, each followed by EOD
    train.docs.npy       int64 offset of each document's first token in train.tokens
    validation.* test.*  the same for the other splits
    tokenizer.json       a non-byte tokenizer (memlm.data.tokenizers; its SHA-256 in the manifest)

`key` is a hash of the source spec (kinds, absolute paths, filters), the split fractions, the
file format and, for a non-byte tokenizer, the SHA-256 of its tokenizer.json. A bpe:N tokenizer
is trained first on the train split's documents and kept under
``<cache_dir>/tokenizers/bpe-N-<hash of the sources, their stamp and the fractions>.json``.
A build is reused while its manifest matches the key and the sources'
stamp (name, size and mtime of every file read); otherwise it is rebuilt in place. An edit
that keeps a file's size and mtime passes that check: `verify=True` (`--verify_data`) also
reads every document and compares the SHA-1 of each split's contents, rebuilding on a change. Every
file is written under a temporary name and renamed into place; the old manifest is removed
before a rebuild starts and the new one written last, so a crash never leaves files that
a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import DataError
from .sources import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, Document, Source, parse_spec
from .splits import DEFAULT_FRACTIONS, SPLITS, assign_split, check_fractions
from .tokenizer import EOD, ByteTokenizer
from .tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, parse_spec as parse_tokenizer_spec
from .tokenizers import read_tokenizer_file, token_dtype, train_bpe

FORMAT = 3  # 2: a lone file is cut by byte offsets into the three splits; 3: file checksums
TOKEN_DTYPE = np.dtype("<u2")
"""dtype of the byte tokenizer's token files (`token_dtype` gives any tokenizer's)."""
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MEMLM_CACHE`` if set, else ``~/.cache/memlm``."""
    return Path(os.environ.get("MEMLM_CACHE") or Path.home() / ".cache" / "memlm").expanduser()


@dataclass
class TokenSplit:
    """One split: its documents' tokens concatenated, each document followed by `EOD`."""

    name: str
    tokens: np.ndarray  # (N,) uint16 or uint32; an np.memmap when loaded from the cache
    doc_starts: np.ndarray  # (D,) int64 offset of each document's first token
    eod: int = EOD  # the tokenizer's end-of-document id
    byte_lengths: np.ndarray | None = None  # (V,) bytes each id counts for in bpb; None = one byte each

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PreparedCorpus:
    """A corpus tokenised into the cache. `rebuilt` says whether this call built it."""

    path: Path
    manifest: dict
    rebuilt: bool
    _tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the corpus was tokenised with (its tokenizer.json checked by SHA-256)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path, self.manifest.get("tokenizer"))
        return self._tokenizer

    def split(self, name: str) -> TokenSplit:
        """The tokens of split `name` (train, validation or test), memory-mapped read-only."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        info = self.manifest["splits"][name]
        if info["documents"] == 0:
            total = sum(s["documents"] for s in self.manifest["splits"].values())
            fractions = ", ".join(f"{k} {v:g}" for k, v in self.manifest["fractions"].items())
            raise DataError(
                f"split {name!r} has no documents (the corpus has {total} documents, fractions {fractions}): "
                f"give it a larger fraction or use more documents"
            )
        for suffix in (".tokens", ".docs.npy"):
            _verify(self.path / f"{name}{suffix}", info["blake2b"][suffix])
        tokens = np.memmap(self.path / f"{name}.tokens", dtype=_dtype(self.manifest), mode="r")
        tokenizer = self.tokenizer
        lengths = None if tokenizer.kind == "byte" else tokenizer.byte_lengths()
        return TokenSplit(name, tokens, np.load(self.path / f"{name}.docs.npy"), tokenizer.eod, lengths)


def blake2b_file(path: Path) -> str:
    """BLAKE2b-128 of a file, read in 4 MiB blocks (fast: about 1 GB/s on one core)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: str) -> None:
    try:
        actual = blake2b_file(path)
    except OSError as e:
        raise DataError(f"cannot read the cached corpus file {path}: {e.strerror or e}") from None
    if actual != expected:
        raise DataError(f"the cached corpus file {path} is corrupt (its BLAKE2b differs from the manifest): "
                        f"delete {path.parent} to rebuild it")


def prepare(
    data: str | os.PathLike | Sequence[str | os.PathLike] = "stdlib",
    cache_dir: str | os.PathLike | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    rebuild: bool = False,
    progress: bool = True,
    verify: bool = False,
    tokenizer: str | Tokenizer = "bytes",
) -> PreparedCorpus:
    """Tokenise the corpus `data` into train/validation/test token files, or reuse the cached ones.

    data: "stdlib", a file, a directory or an archive, or several (comma-separated or a list);
        see `memlm.data.sources`. include / exclude: glob patterns for directories and zips.
    cache_dir: where builds live; None = ``$MEMLM_CACHE`` or ``~/.cache/memlm``.
    fractions: (train, validation, test) share of documents, by a hash of each document's name.
        Empty documents are skipped; every other document is followed by `EOD` in its split.
    rebuild: build even if a matching cache exists. progress: show a progress bar while building.
    verify: reuse a cache only if the contents of its documents, read again, still match it.
    tokenizer: a --tokenizer spec (bytes, bpe:N trained on this corpus's train split, hf:PATH;
        memlm.data.tokenizers) or a tokenizer object (a run's, to score other data with it).
    """
    fractions = check_fractions(fractions)
    sources = parse_spec(data, include, exclude)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stamp = _sha1_json([s.stamp() for s in sources])
    tokenizer = _resolve_tokenizer(tokenizer, sources, fractions, stamp, root, rebuild)
    described = {"format": FORMAT, "sources": [s.key for s in sources], "fractions": fractions}
    if tokenizer.kind != "byte":  # byte corpora keep the keys they always had
        described["tokenizer"] = {"sha256": tokenizer.sha256}
    key = _sha1_json(described)
    path = root / key[:16]
    manifest = None if rebuild else _load_manifest(path, key, stamp)
    if manifest is not None and verify and _content_sha1(sources, fractions) != {
            name: info["sha1"] for name, info in manifest["splits"].items()}:
        log.info("the contents of %s changed since it was cached: rebuilding", data)
        manifest = None
    if manifest is not None:
        return PreparedCorpus(path, manifest, rebuilt=False)
    start = time.perf_counter()
    try:
        path.mkdir(parents=True, exist_ok=True)
        splits = _build(sources, fractions, path, progress, tokenizer)
        if tokenizer.kind != "byte":
            with _atomic_open(path / TOKENIZER_FILE) as f:
                f.write(tokenizer.json.encode())
        manifest = {
            "format": FORMAT,
            "key": key,
            "stamp": stamp,
            "sources": [s.key for s in sources],
            "inventory": [s.inventory() for s in sources],
            "fractions": dict(zip(SPLITS, fractions)),
            "tokenizer": tokenizer.describe(),
            "splits": splits,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        with _atomic_open(path / MANIFEST) as f:
            f.write(json.dumps(manifest, indent=2).encode())
    except OSError as e:  # reading errors are DataErrors already: this is the cache (permissions, full disk)
        raise DataError(f"cannot write the cache directory {path}: {e.strerror or e}") from None
    log.info(
        "prepared %s in %.1fs: %s",
        path,
        manifest["build_seconds"],
        ", ".join(f"{k} {v['documents']} docs / {v['tokens']} tokens" for k, v in splits.items()),
    )
    return PreparedCorpus(path, manifest, rebuilt=True, _tokenizer=tokenizer)


def _resolve_tokenizer(tokenizer: str | Tokenizer, sources: list[Source], fractions: tuple[float, float, float],
                       stamp: str, root: Path, rebuild: bool) -> Tokenizer:
    """The tokenizer object of a spec: bpe:N trained on the train split's documents (or read back
    from where an earlier training left it under `root`/tokenizers)."""
    if not isinstance(tokenizer, str):
        return tokenizer
    kind, arg = parse_tokenizer_spec(tokenizer)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return read_tokenizer_file(arg, tokenizer)
    key = _sha1_json({"bpe": arg, "sources": [s.key for s in sources], "stamp": stamp, "fractions": fractions})
    file = root / "tokenizers" / f"bpe-{arg}-{key[:16]}.json"
    if file.is_file() and not rebuild:
        return read_tokenizer_file(file, tokenizer, kind="bpe")
    log.info("training a byte-level BPE of %d tokens on the train split of %s", arg,
             ", ".join(str(s) for s in sources))
    texts = (bytes(doc.data).decode("utf-8", errors="replace")
             for split, doc in _assigned_documents(sources, fractions) if split == "train")
    trained = train_bpe(arg, texts)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_open(file) as f:
            f.write(trained.json.encode())
    except OSError as e:
        raise DataError(f"cannot write the cache directory {file.parent}: {e.strerror or e}") from None
    return trained


def _dtype(manifest: dict) -> np.dtype:
    """The dtype of a manifest's token files (uint16 unless its tokenizer says otherwise)."""
    return np.dtype(manifest.get("tokenizer", {}).get("dtype", "uint16")).newbyteorder("<")


def _sha1_json(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _load_manifest(path: Path, key: str, stamp: str) -> dict | None:
    """The manifest at `path` if it describes this key and stamp and all its files are whole."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if (manifest["format"], manifest["key"], manifest["stamp"]) != (FORMAT, key, stamp):
            return None
        for name, info in manifest["splits"].items():
            if info["documents"] and (path / f"{name}.tokens").stat().st_size != info["tokens"] * _dtype(manifest).itemsize:
                return None
        described = manifest.get("tokenizer") or {}
        if described.get("kind", "byte") != "byte" and not (path / described.get("file", TOKENIZER_FILE)).is_file():
            return None
            if info["documents"] and not (path / f"{name}.docs.npy").is_file():
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


@contextmanager
def _atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A temporary file next to `path`: on success fsync'ed and renamed to `path`, on error removed."""
    f = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
    except BaseException:
        Path(f.name).unlink(missing_ok=True)
        raise


class _SplitWriter:
    """Appends documents to one split's token file and counts what it wrote.

    For a non-byte tokenizer it also counts `scored_bytes`, the bytes its tokens stand for
    (`byte_lengths`, EODs included): what evaluating the whole split divides its nats by."""

    def __init__(self, file: BinaryIO, tokenizer: Tokenizer):
        self.file, self.tokenizer = file, tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.eod = np.array([tokenizer.eod], self.dtype).tobytes()
        self.lengths = None if tokenizer.kind == "byte" else tokenizer.byte_lengths()
        self.starts: list[int] = []
        self.tokens = self.bytes = self.scored_bytes = self.text_bytes = 0
        self.sha1 = hashlib.sha1()
        self.blake2b = hashlib.blake2b(digest_size=16)  # of the bytes written

    def add(self, doc: Document) -> None:
        ids = self.tokenizer.encode(doc.data, dtype=self.dtype)  # (n,)
        for piece in (memoryview(ids), self.eod):
            self.file.write(piece)
            self.blake2b.update(piece)
        self.starts.append(self.tokens)
        self.tokens += len(ids) + 1
        self.bytes += len(doc.data)
        if self.lengths is not None:
            self.scored_bytes += int(self.lengths[ids].sum()) + 1  # + 1: the EOD
            self.text_bytes += len(bytes(doc.data).decode("utf-8", errors="replace").encode()) + 1
        _content_update(self.sha1, doc)

    def summary(self) -> dict:
        summary = {
            "documents": len(self.starts), "bytes": self.bytes, "tokens": self.tokens, "sha1": self.sha1.hexdigest()
        }
        if self.lengths is not None:
            summary["scored_bytes"] = self.scored_bytes
        return summary


SINGLE_DOCUMENT_KINDS = ("file", "compressed")
"""Sources that are one document: alone in a data spec, they are cut by byte offsets."""


def cut_by_offsets(documents, fractions: tuple[float, float, float]):
    """A lone document cut into train / validation / test by byte offsets in the given fractions
    (the first bytes train, then validation, then the last bytes test), as enwik8 is, so a single
    file fills every split instead of landing whole in one."""
    for doc in documents:
        size = len(doc.data)
        train_end = round(size * fractions[0])
        validation_end = train_end + round(size * fractions[1])
        for split, (start, stop) in zip(SPLITS, [(0, train_end), (train_end, validation_end), (validation_end, size)]):
            yield Document(f"{doc.name}[{split}]", split, memoryview(doc.data)[start:stop])


def _assigned_documents(sources: list[Source], fractions: tuple[float, float, float],
                        bar: Progress | None = None) -> Iterator[tuple[str, Document]]:
    """(split, document) for every non-empty document of `sources`, in build order."""
    for source in sources:
        task = bar.add_task(source.label, total=source.count()) if bar is not None else None
        count = 0
        documents = source.documents()
        if len(sources) == 1 and source.kind in SINGLE_DOCUMENT_KINDS:
            documents = cut_by_offsets(documents, fractions)
        for doc in documents:
            if bar is not None:
                bar.advance(task)
            if len(doc.data):
                yield doc.split or assign_split(doc.name, fractions), doc
                count += 1
        if count == 0:
            raise DataError(
                f"empty corpus: {source} has no non-empty text documents "
                f"(empty files, binary files and files outside the include/exclude globs are skipped)"
            )


def _content_sha1(sources: list[Source], fractions: tuple[float, float, float]) -> dict[str, str]:
    """The SHA-1 of each split's contents, as a build records it, from the documents read now."""
    digests = {name: hashlib.sha1() for name in SPLITS}
    for split, doc in _assigned_documents(sources, fractions):
        _content_update(digests[split], doc)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _content_update(digest, doc: Document) -> None:
    """Add a document (its name, length and bytes) to a split's content SHA-1."""
    digest.update(f"{doc.name}\0{len(doc.data)}\0".encode("utf-8", "surrogateescape"))
    digest.update(doc.data)


def _build(sources: list[Source], fractions: tuple[float, float, float], path: Path, progress: bool,
           tokenizer: Tokenizer) -> dict:
    """Tokenise every document of `sources` into the split files under `path`; per-split summaries."""
    (path / MANIFEST).unlink(missing_ok=True)
    columns = (TextColumn("tokenising {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with ExitStack() as stack:
        writers = {name: _SplitWriter(stack.enter_context(_atomic_open(path / f"{name}.tokens")), tokenizer)
                   for name in SPLITS}
        console = Console(stderr=True)
        bar = stack.enter_context(Progress(*columns, console=console, transient=True, disable=not progress))
        for split, doc in _assigned_documents(sources, fractions, bar):
            writers[split].add(doc)
    summaries = {}
    for name, writer in writers.items():
        if writer.scored_bytes != writer.text_bytes:
            log.warning("the %s split's %d tokens stand for %d bytes by the tokenizer's pieces, its documents hold "
                        "%d: bits per byte with this tokenizer are approximate", name, writer.tokens,
                        writer.scored_bytes, writer.text_bytes)
        with _atomic_open(path / f"{name}.docs.npy") as f:
            np.save(f, np.array(writer.starts, np.int64))
        summaries[name] = {**writer.summary(), "blake2b": {".tokens": writer.blake2b.hexdigest(),
                                                           ".docs.npy": blake2b_file(path / f"{name}.docs.npy")}}
    return summaries
