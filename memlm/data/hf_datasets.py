"""``--data hf:PATH``: local files read through the Hugging Face `datasets` library, streamed.

PATH is a file, a directory (its files of one recognised kind, recursively, hidden ones
skipped) or a glob; an option ``:field=NAME`` names the text column (default ``text``)::

    hf:corpus/                      every .txt / .json / .jsonl / .parquet file under corpus/
    hf:shards/*.parquet:field=content

The loader follows the suffix: ``.txt`` / ``.text`` / ``.md`` with the ``text`` builder, one
document per file (``sample_by="document"``); ``.json`` / ``.jsonl`` with ``json`` and
``.parquet`` with ``parquet``, one document per row, its ``field`` column. Every file is
loaded with ``streaming=True``: rows arrive in batches and are tokenised one at a time, so a
corpus larger than memory is tokenised in one pass. Only the local packaged builders are used
(``HF_DATASETS_OFFLINE=1`` is set unless the environment says otherwise): nothing downloads.
A document is named ``<file relative to PATH>#<row>``, which decides its split.
"""

from __future__ import annotations

import gc
import glob
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError
from .sources import DEFAULT_EXCLUDE, Document, Source, _matches

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}
"""File suffix -> the `datasets` packaged builder that reads it."""
DEFAULT_FIELD = "text"


def _import_datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never ask the Hub
    try:
        import datasets
    except ImportError:
        raise DataError("--data hf:... needs the `datasets` library: pip install 'memlm[data]'") from None
    datasets.disable_progress_bars()
    return datasets


class HFFiles(Source):
    """Local text, JSON lines or Parquet files, streamed through `datasets.load_dataset`."""

    kind = "hf"

    def __init__(self, spec: str):
        path, field = spec, DEFAULT_FIELD
        head, sep, option = spec.rpartition(":")
        if sep and option.startswith("field="):
            path, field = head, option.removeprefix("field=")
        if not path or not field:
            raise DataError(f"--data hf:{spec}: expected hf:PATH or hf:PATH:field=NAME")
        self.pattern, self.field = path, field
        base = Path(path).expanduser()
        if any(c in path for c in "*?["):
            files = [Path(p).resolve() for p in glob.glob(str(base), recursive=True) if Path(p).is_file()]
            self.root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else base.parent
        elif base.is_dir():
            self.root = base.resolve()
            files = [p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS
                     and not _matches(p.relative_to(self.root).as_posix(), DEFAULT_EXCLUDE)]
        elif base.is_file():
            self.root, files = base.resolve().parent, [base.resolve()]
        else:
            raise DataError(f"data source not found: hf:{path} (expected a file, a directory or a glob)")
        if not files:
            raise DataError(f"hf:{path} matches no .txt, .json, .jsonl or .parquet file")
        builders = {BUILDERS.get(f.suffix.lower()) for f in files}
        if None in builders:
            odd = next(f for f in files if f.suffix.lower() not in BUILDERS)
            raise DataError(f"hf:{path}: cannot read {odd.name} (known suffixes: {', '.join(BUILDERS)})")
        if len(builders) > 1:
            raise DataError(f"hf:{path} mixes file kinds ({', '.join(sorted(builders))}): give each kind as its own "
                            f"source, separated by a comma")
        self.builder = builders.pop()
        self.files = sorted(files)
        super().__init__(self.root)
        self.label = f"hf:{Path(path).name or path}"

    @property
    def key(self) -> dict:
        return {"kind": self.kind, "files": [str(f) for f in self.files], "builder": self.builder,
                "field": self.field}

    def stamp(self) -> list:
        stamps = []
        for f in self.files:
            st = f.stat()
            stamps.append([str(f), st.st_size, st.st_mtime_ns])
        return stamps

    def count(self) -> int | None:
        return None  # rows are known only once read

    def documents(self) -> Iterator[Document]:
        datasets = _import_datasets()
        for file in self.files:
            name = file.relative_to(self.root).as_posix()
            options = {"sample_by": "document"} if self.builder == "text" else {}
            rows = None
            try:
                rows = datasets.load_dataset(self.builder, data_files=[str(file)], split="train", streaming=True,
                                             **options)
                for index, row in enumerate(rows):
                    if self.field not in row:
                        raise DataError(f"{file}: row {index} has no field {self.field!r} (it has "
                                        f"{', '.join(row) or 'none'}): name the text column with hf:PATH:field=NAME")
                    text = row[self.field]
                    if text is None:
                        continue
                    if not isinstance(text, str):
                        raise DataError(f"{file}: row {index}: field {self.field!r} holds {type(text).__name__}, "
                                        f"not text")
                    yield Document(f"{name}#{index:09d}", None, text.encode("utf-8", errors="surrogatepass"))
            except DataError:
                raise
            except Exception as e:  # datasets and pyarrow raise many kinds for a malformed file
                raise DataError(f"cannot read {file} with the datasets {self.builder!r} loader: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            finally:
                # Arrow's Parquet scanner threads must end while Arrow is alive, not at interpreter exit
                # (apache/arrow#45214, huggingface/datasets#7566: else an abort after a successful run)
                del rows
                gc.collect()

    def __str__(self) -> str:
        return f"hf:{self.pattern}"
