"""Saved kNN stores (memlm.memory.knn.store; "Memorizing Transformers", Wu et al., arXiv
2203.08913). `store.save(directory)` (`save_store`) writes, atomically (temporary directory +
rename),

    manifest.json          format, version, kind, rows, heads, dim, capacity, dtype, shared,
                           options, counts, written, write_pointer, sha256 and size of each file
    keys.safetensors       {"keys": (rows, heads, capacity, dim)}
    values.safetensors     {"values": ...}
    positions.safetensors  {"positions": (rows, capacity) int64}
    indexes.safetensors    faiss ivf/hnsw only: {"index.<row>.<head>": serialized faiss index
                           (uint8)}, so a load rebuilds no graph and retrains nothing (flat
                           has no index: loading it is a copy of the tensors)

and `read_saved` (under `load_store(directory, device)`, memlm.memory.knn.stores) verifies
checksums, shapes and the manifest, raising StoreError naming the offending file.
`state_dict()` holds the same tensors (plus counts and written) for training checkpoints;
`load_state_dict` restores them into a store built with the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from memlm.fileio import sha256_file, write_dir_atomically
from memlm.memory.knn.store import Store, StoreError

__all__ = ["FORMAT", "MANIFEST", "VERSION", "read_saved", "save_store"]

FORMAT, VERSION = "memlm.knn-store", 1
MANIFEST = "manifest.json"
KEYS, VALUES, POSITIONS, INDEXES = "keys.safetensors", "values.safetensors", "positions.safetensors", \
    "indexes.safetensors"


def save_store(store: Store, directory: str | Path) -> Path:
    """`store.save(directory)`: write the store to `directory` atomically; returns it."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in store.state_dict().items()}
    files = {KEYS: {"keys": tensors["keys"]}, VALUES: {"values": tensors["values"]},
             POSITIONS: {"positions": tensors["positions"]}}
    indexes = {k: v for k, v in tensors.items() if k.startswith("index.")}
    if indexes:
        files[INDEXES] = indexes
    written = tensors["written"].tolist()
    manifest = {"format": FORMAT, "version": VERSION, "kind": store.kind, "rows": store.rows,
                "heads": store.heads, "dim": store.dim, "capacity": store.capacity,
                "dtype": str(store.dtype).removeprefix("torch."), "shared": store.shared,
                "options": store.options(), "counts": tensors["counts"].tolist(), "written": written,
                "write_pointer": [w % store.capacity for w in written]}
    return _save_atomic(Path(directory), files, manifest)


def _save_atomic(directory: Path, files: dict[str, dict[str, torch.Tensor]], manifest: dict) -> Path:
    """Write `files` and the manifest into a temporary sibling directory, then rename it to
    `directory` (an existing saved store there is replaced; anything else is refused)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())
                               and not (directory / MANIFEST).is_file()):
        raise StoreError(f"refusing to overwrite {directory}: it exists and holds no saved store")

    def fill(tmp: Path) -> None:
        listed = {**manifest, "files": {}}
        for name, tensors in files.items():
            safetensors.torch.save_file(tensors, str(tmp / name))
            listed["files"][name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(listed, indent=2) + "\n")

    return write_dir_atomically(directory, fill)



def read_saved(directory: Path, **expected) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and the tensors (keys, values, positions, counts, written and any faiss
    index.<row>.<head>) of a store written by `save_store`, after verifying the manifest, every
    file's checksum and every tensor's shape; `expected` (e.g. kind="faiss", heads=2, dim=64) must
    match the manifest. Raises StoreError naming the bad file."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read the store manifest {path}: {e}") from None
    try:
        if (manifest["format"], manifest["version"]) != (FORMAT, VERSION):
            raise StoreError(f"{path} is not a memlm kNN store of version {VERSION} "
                             f"(format {manifest['format']!r}, version {manifest['version']!r})")
        kind, rows, heads, dim, capacity = (manifest[k] for k in ("kind", "rows", "heads", "dim", "capacity"))
        counts, written, pointer = manifest["counts"], manifest["written"], manifest["write_pointer"]
        files, options, dtype = manifest["files"], dict(manifest["options"]), manifest["dtype"]
        for name, want in expected.items():  # top-level fields, or backend options such as index
            have = manifest[name] if name in manifest else options.get(name)
            if have != want:
                raise StoreError(f"{path}: the saved store has {name}={have!r}, expected {want!r}")
        sizes_ok = all(isinstance(v, int) and v > 0 for v in (rows, heads, dim, capacity))
        if not sizes_ok or not (len(counts) == len(written) == len(pointer) == rows) or any(
                w < 0 or c != min(w, capacity) or p != w % capacity for c, w, p in zip(counts, written, pointer)):
            raise StoreError(f"{path} is inconsistent (sizes, counts, written and write_pointer disagree)")
    except (KeyError, TypeError) as e:
        raise StoreError(f"{path} lacks or garbles the field {e}") from None
    needed = [KEYS, VALUES, POSITIONS] + ([INDEXES] if kind == "faiss" and options.get("index") != "flat" else [])
    state: dict[str, torch.Tensor] = {}
    for name in needed:
        file = directory / name
        if name not in files:
            raise StoreError(f"{path} lists no {name}")
        if not file.is_file():
            raise StoreError(f"missing store file {file}")
        if file.stat().st_size != files[name].get("bytes") or sha256_file(file) != files[name].get("sha256"):
            raise StoreError(f"store file {file} is corrupted or truncated (its size or sha256 does not match "
                             f"{MANIFEST})")
        try:
            state.update(safetensors.torch.load_file(str(file)))
        except (OSError, RuntimeError, safetensors.SafetensorError) as e:
            raise StoreError(f"cannot read store file {file}: {str(e).splitlines()[0]}") from None
    shapes = {KEYS: ("keys", (rows, heads, capacity, dim)), VALUES: ("values", (rows, heads, capacity, dim)),
              POSITIONS: ("positions", (rows, capacity))}
    for name, (key, shape) in shapes.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else "nothing"
            raise StoreError(f"store file {directory / name} holds {key} of shape {got}, the manifest says {shape}")
    if str(state["keys"].dtype).removeprefix("torch.") != dtype:
        raise StoreError(f"store file {directory / KEYS} holds {state['keys'].dtype}, the manifest says {dtype}")
    state["counts"] = torch.tensor(counts, dtype=torch.long)
    state["written"] = torch.tensor(written, dtype=torch.long)
    return manifest, state
