"""Knowledge memory: a trained kNN model memorises a corpus once; later runs read it.

"Memorizing Transformers" (Wu et al., arXiv 2203.08913) lets a kNN layer attend to its own
stream's past (key, value) pairs. Here the same layers read a fixed memory of a whole
corpus instead, built once by running the trained model over it:

    memlm memorize RUN --data SRC --out MEMDIR     ->  MEMDIR/manifest.json
                                                       MEMDIR/layer-<i>/  (memlm.memory.knn.stores format)
    memlm eval RUN --memory MEMDIR                 (or memlm generate ... --memory MEMDIR)

Memorising (`memorize`) reads the split as `batch_size` contiguous streams (memlm.data.Streams,
wrap=False) exactly as `memlm.eval.evaluate` does: the state is carried from segment to
segment and reset at document starts (`reset_at_document`), so every kNN layer writes each
completed segment's keys and values into its per-row store, as in evaluation. After every
segment the entries just written are copied out (before FIFO eviction or a document reset
can drop them); the final partial segment, which never completes, is written explicitly.
Padding after a stream's end is dropped, so each layer holds one entry per memorised token
(per key/value head). The rows are then merged, row 0's stream first, into ONE one-row store
per layer of capacity = the number of entries (or `capacity`: a smaller one keeps the last
`capacity` entries of that order, FIFO as the stores evict). An entry's position is its
token's offset in the split.

Reading (`load_memory`): each layer's store is loaded shared and read-only and set as
`model.knowledge`; every batch row reads the same memory, which is never written, reset or
checkpointed. `LanguageModel.init_state` then combines it with each kNN layer's per-row store
as `model.knowledge_mode` says (`memlm eval/generate --memory-mode`):
- fill (default): the layer reads its own stream's past first and the knowledge memory in the
  slots that past leaves empty (a document's start, short documents); completed segments are
  written to the own store as in training (memlm.memory.knn.stores.WithKnowledge).
- add: the best k of both by score. A large knowledge memory then fills nearly every slot.
- replace: the knowledge memory takes the own store's place, so the kNN layer retrieves from
  the memorised corpus only (its recurrent/local attention still sees the stream's past), so it
  loses the past the model learnt to read (BENCHMARKS.md has the measurement).
Departure from the paper: there the memory is the document's own past only.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable

import torch

from memlm.data import Streams, TokenSplit
from memlm.fileio import write_dir_atomically
from memlm.memory.knn import write_segment
from memlm.memory.knn.stores import Store, StoreError, load_store, make_store

FORMAT, VERSION = "memlm.knowledge-memory", 1
MANIFEST = "manifest.json"


class KnowledgeError(Exception):
    """A knowledge memory that cannot be built or used (a one-line message for the user): a
    model without kNN layers, a directory that is not a memory, a memory of another model."""


def layer_dir(layer: int) -> str:
    return f"layer-{layer}"


def knn_layers(model) -> list[int]:
    layers = list(model.config.memory.knn.layers or ())
    if not layers:
        raise KnowledgeError("the model has no kNN layers (model.memory.knn.layers), so it has no memory to "
                             "write or read: train one with --model.memory.knn.layers")
    return layers


def _new_entries(store: Store, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The entries each row received since `before` (B,) written counts, oldest first, on the
    CPU: keys, values (B, Hkv, n, D), positions (B, n); None when nothing was written. All rows
    write together (a completed segment), so n is the same for every row."""
    n = int((store.written - before.to(store.written.device)).max())
    n = min(n, store.capacity)  # a write longer than the store keeps only its last `capacity`
    if n <= 0:
        return None
    slots = (store.written[:, None] - n + torch.arange(n, device=store.written.device)) % store.capacity  # (B, n)
    rows = torch.arange(store.rows, device=slots.device)[:, None]  # (B, 1)
    keys = store.keys[rows, :, slots].transpose(1, 2)  # (B, Hkv, n, D)
    values = store.values[rows, :, slots].transpose(1, 2)
    return keys.float().cpu(), values.float().cpu(), store.positions[rows, slots].cpu()


@torch.no_grad()
def memorize(model, split: TokenSplit, batch_size: int, max_tokens: int | None = None,
             capacity: int | None = None, *, reset: bool | None = None,
             progress: Callable[[int, int | None], None] | None = None) -> tuple[dict[int, Store], int]:
    """Run `model` over `split` and return ({layer: shared one-row store}, tokens memorised);
    see the module docstring.

    max_tokens: memorise about this many tokens: the first max_tokens // (batch_size * seq_len)
        segments (at least one) of streams spread evenly over the split, as `evaluate` samples.
    capacity: entries per store; None = every memorised token.
    reset: reset the state at document starts; None = `model.config.memory.reset_at_document`.
    progress: called as progress(segments done, segments in all or None) after each segment.
    Runs in the caller's precision (wrap it in autocast for bf16); the stores live on the CPU in
    the model's `memory.knn.dtype` (exact backend; the faiss backend holds float32), and
    `load_memory` moves exact stores to the model's device.
    """
    layers = knn_layers(model)
    if batch_size < 1:
        raise KnowledgeError(f"batch size must be positive, got {batch_size}")
    if capacity is not None and capacity < 1:
        raise KnowledgeError(f"capacity must be positive, got {capacity}")
    T = model.config.seq_len
    reset = model.config.memory.reset_at_document if reset is None else reset
    streams = Streams(split, batch_size, T, wrap=False)
    total = -(-streams.longest // T)
    segments = min(total, max(1, max_tokens // (batch_size * T))) if max_tokens is not None else total
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: dict[int, list] = {layer: [] for layer in layers}
    tokens = 0
    state = model.init_state(batch_size, device=device, knowledge={})  # per-row stores, as in training
    try:
        for done, segment in enumerate(itertools.islice(streams, segments), 1):
            starts = segment.doc_start[:, 0]
            if reset and state.position > 0 and bool(starts.any()):
                state = state.reset(starts.to(device))
            before = {layer: state.stores[layer].written.clone() for layer in layers}
            state = model(segment.x.to(device), state=state).state
            tokens += int(segment.valid.sum())
            for layer in layers:
                if (new := _new_entries(state.stores[layer], before[layer])) is not None:
                    chunks[layer].append(new)
            if progress is not None:
                progress(done, segments)
        for layer in layers:  # the last, partial segment never completes: write it now
            pending = state.layers[layer].pending
            if pending is not None and pending.shape[1]:
                store, before = state.stores[layer], state.stores[layer].written.clone()
                write_segment(model.blocks[layer], store, pending, state.position - pending.shape[1])
                if (new := _new_entries(store, before)) is not None:
                    chunks[layer].append(new)
    finally:
        model.train(was_training)
    start, length = torch.as_tensor(streams.start), torch.as_tensor(streams.length)  # (B,) each
    config = model.config
    stores = {}
    for layer in layers:
        keys, values, positions = [], [], []
        for b in range(batch_size):  # row b's stream, in order; padding after its end is dropped
            for k, v, p in chunks[layer]:
                keep = (p[b] >= 0) & (p[b] < length[b])  # (n,)
                keys.append(k[b][:, keep])
                values.append(v[b][:, keep])
                positions.append(p[b][keep] + start[b])
        keys_all = torch.cat(keys, dim=1)[None] if keys else torch.zeros(1, config.kv_heads, 0, config.head_dim)
        n = keys_all.shape[2]
        if n == 0:
            raise KnowledgeError("nothing to memorise: the split holds no tokens")
        m = config.memory
        store = make_store(m.knn.backend, rows=1, heads=config.kv_heads, dim=config.head_dim, capacity=capacity or n,
                           device="cpu", **({"dtype": m.knn.dtype} if m.knn.backend == "exact" else {}))
        store.write(keys_all, torch.cat(values, dim=1)[None], torch.cat(positions))
        stores[layer] = store.share()
    return stores, tokens


# ----- on disk ----------------------------------------------------------------------------

def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a knowledge memory directory, or None when `directory` is not one."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def check_target(directory: str | Path) -> Path:
    """Refuse an output path that exists and is not an empty directory or a knowledge memory."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())
                               and read_manifest(directory) is None):
        raise KnowledgeError(f"refusing to write the memory into {directory}: it exists and is not a knowledge "
                             f"memory directory (no {MANIFEST} written by memlm memorize)")
    return directory


def save_memory(directory: str | Path, stores: dict[int, Store], manifest: dict[str, Any]) -> Path:
    """Write MEMDIR/layer-<i>/ (Store.save) and MEMDIR/manifest.json into a temporary sibling,
    then rename it to `directory` (an earlier memory there is replaced)."""
    directory = check_target(directory)
    layers = {str(layer): {"dir": layer_dir(layer), "entries": int(store.counts[0]), "capacity": store.capacity,
                           "heads": store.heads, "dim": store.dim, "kind": store.kind}
              for layer, store in sorted(stores.items())}
    manifest = {"format": FORMAT, "version": VERSION, **manifest, "layers": layers}

    def fill(tmp: Path) -> None:
        for layer, store in stores.items():
            store.save(tmp / layer_dir(layer))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return write_dir_atomically(directory, fill)


def load_memory(directory: str | Path, model, device: torch.device | str | None = None) -> dict[int, Store]:
    """The stores of a knowledge memory, loaded shared and read-only, checked against `model`
    (its kNN layers, key/value heads and head dim). Set them as `model.knowledge` to use them."""
    directory = Path(directory)
    layers = knn_layers(model)
    if not directory.is_dir():
        raise KnowledgeError(f"no such memory directory: {directory}")
    manifest = read_manifest(directory)
    if manifest is None:
        raise KnowledgeError(f"{directory} is not a knowledge memory directory (no {MANIFEST} written by "
                             f"memlm memorize)")
    if manifest.get("version") != VERSION:
        raise KnowledgeError(f"{directory / MANIFEST} has version {manifest.get('version')!r}, this memlm reads "
                             f"version {VERSION}")
    heads, dim = model.config.kv_heads, model.config.head_dim
    stores = {}
    for key, info in sorted(manifest.get("layers", {}).items(), key=lambda item: int(item[0])):
        layer = int(key)
        if layer not in layers:
            raise KnowledgeError(f"{directory} holds a memory of layer {layer}, which is not a kNN layer of this "
                                 f"model (memory.knn.layers = {layers}): it was memorised by another model")
        if (info.get("heads"), info.get("dim")) != (heads, dim):
            raise KnowledgeError(f"{directory}: the memory of layer {layer} holds keys of {info.get('heads')} "
                                 f"key/value heads x {info.get('dim')} dims, this model's layer {layer} has {heads} x "
                                 f"{dim}: it was memorised by another model")
        try:
            store = load_store(directory / info["dir"], device, shared=True, heads=heads, dim=dim)
        except StoreError as e:
            raise KnowledgeError(f"cannot load the memory of layer {layer}: {e}") from None
        stores[layer] = store
    if not stores:
        raise KnowledgeError(f"{directory / MANIFEST} lists no layers")
    return stores


__all__ = ["KnowledgeError", "check_target", "load_memory", "memorize", "read_manifest", "save_memory"]
