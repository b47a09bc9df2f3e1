"""`memlm memorize`: save what a kNN model's memory layers write over a corpus as a knowledge memory
(memlm.memorize) that `memlm eval/generate --memory MEMDIR` read."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from memlm.cli.common import RunPath, UsageError
from memlm.data import prepare
from memlm.device import autocast, pick_device
from memlm.memorize import KnowledgeError, check_target, memorize, save_memory
from memlm.train import load_model, load_tokenizer
from memlm.train.checkpoint import find


@dataclass
class MemorizeCommand:
    path: RunPath
    """Run directory (its checkpoints/latest) or checkpoint directory of a model with kNN layers."""
    out: str
    """Memory directory to write (MEMDIR/layer-<i>/ and MEMDIR/manifest.json); an earlier memory there is replaced."""
    data: str | None = None
    """Corpus to memorise; None = the run's training corpus."""
    split: str = "train"
    """Split: train, validation or test."""
    max_tokens: int | None = None
    """Memorise about this many tokens (whole segments of streams spread over the split); None = all of it."""
    batch_size: int | None = None
    """Streams run in parallel; None = the run's training batch size."""
    capacity: int | None = None
    """Entries kept per layer (the last ones); None = one per memorised token."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    json: bool = False
    """Print the memory's manifest as one JSON object on the last line."""


def run(argv: list[str]) -> int:
    args = tyro.cli(MemorizeCommand, args=argv, prog="memlm memorize",
                    description="Run a model with kNN layers over a corpus and save what its kNN layers write as a "
                                "knowledge memory that `memlm eval/generate --memory MEMDIR` read.")
    for name in ("batch_size", "max_tokens", "capacity"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    check_target(args.out)
    device = pick_device(args.device)
    model, saved = load_model(args.path, device)
    if not model.config.memory.knn.layers:
        raise KnowledgeError(f"the model of {args.path} has no kNN layers (model.memory.knn.layers), so it has "
                             f"nothing to memorise with: train one with --model.memory.knn.layers")
    train_config = saved["train"]
    data = args.data or train_config["data"]
    fractions = train_config.get("fractions", (0.98, 0.01, 0.01))
    corpus = prepare(data, train_config.get("cache_dir"), fractions, tokenizer=load_tokenizer(args.path, saved))
    batch_size = args.batch_size or train_config["batch_size"]
    split = corpus.split(args.split)

    def progress(done: int, total: int | None) -> None:
        if done == total or done % 100 == 0:
            print(f"memorised {done:,}/{total:,} segments", file=sys.stderr)

    with autocast(device, train_config.get("precision", "auto")):
        stores, tokens = memorize(model, split, batch_size, args.max_tokens, args.capacity, progress=progress)
    checkpoint = find(args.path)
    entries = sum(int(store.counts[0]) for store in stores.values())
    print(f"writing {entries:,} entries to {args.out}", file=sys.stderr)  # can take minutes for GBs
    manifest = {"model": {"run": str(args.path), "checkpoint": str(checkpoint), "knn_layers": sorted(stores),
                          "kv_heads": model.config.kv_heads, "head_dim": model.config.head_dim,
                          "seq_len": model.config.seq_len},
                "data": {"spec": data, "split": args.split, "fractions": list(fractions)},
                "tokens": tokens, "batch_size": batch_size, "max_tokens": args.max_tokens,
                "capacity": args.capacity}
    save_memory(args.out, stores, manifest)
    written = json.loads((Path(args.out) / "manifest.json").read_text())
    print(f"memorised {tokens:,} tokens of {data} ({args.split}) into {args.out}: " + ", ".join(
        f"layer {layer} {info['entries']:,} entries" for layer, info in written["layers"].items()))
    if args.json:
        print(json.dumps({"dir": str(args.out), **written}))
    return 0
