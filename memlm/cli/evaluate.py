"""`memlm eval`: bits per byte of a trained model on a split, or its long-range recall (--task recall),
with an optional knowledge memory (`attach_memory`, also used by `memlm generate`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from memlm.cli.common import RunPath, UsageError
from memlm.data import prepare
from memlm.device import autocast, pick_device
from memlm.eval import evaluate
from memlm.memorize import load_memory
from memlm.model import LanguageModel
from memlm.tasks import DISTANCES, recall_accuracy, recall_markdown
from memlm.train import load_model, load_tokenizer
from memlm.train.checkpoint import find


@dataclass
class EvalCommand:
    path: RunPath
    """Run directory (its checkpoints/latest) or checkpoint directory."""
    task: Literal["bpb", "recall"] = "bpb"
    """bpb: bits per byte on a split of a corpus; recall: the long-range recall task by distance (memlm.tasks, no corpus)."""
    data: str | None = None
    """Corpus to evaluate on; None = the run's training corpus (bpb only)."""
    split: str = "test"
    """Split: train, validation or test (bpb only)."""
    batch_size: int | None = None
    """Streams (bpb) or documents (recall) scored in parallel; None = the run's training batch size (bpb), 16 (recall)."""
    max_tokens: int | None = None
    """Score about this many tokens (whole segments of streams spread over the split); None = all of it (bpb only)."""
    distances: tuple[int, ...] = DISTANCES
    """Recall: filler bytes between a definition and its query, one row each."""
    documents: int = 64
    """Recall: documents per distance."""
    pairs: int = 1
    """Recall: key/value definitions per document (more = associative recall among distractors)."""
    seed: int = 0
    """Recall: seed of the documents (the same seed, the same documents)."""
    no_memory: bool = False
    """Recall: score without the model's memory (independent windows of seq_len), the no-memory baseline."""
    memory: str | None = None
    """Knowledge memory directory (memlm memorize), read-only, read by every row's kNN layers."""
    memory_multiplier: float | None = None
    """Evaluate with recurrent memories this many times as long as trained (the model's
    memory.xl.eval_multiplier; Transformer-XL tests with a longer memory than it trains with);
    None = the run's own setting."""
    memory_mode: Literal["fill", "add", "replace"] = "fill"
    """How the kNN layers read the knowledge memory beside their own stream's past: fill (the slots
    the own past leaves empty, e.g. at a document's start), add (the best k of both by score), or
    replace (the knowledge memory only)."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    json: bool = False
    """Print the result as one JSON object on the last line."""


def attach_memory(model: LanguageModel, memory: str | None, device: torch.device, mode: str = "fill") -> dict | None:
    """Load a knowledge memory into `model.knowledge`, used as `mode` says; a short description of it,
    or None."""
    if memory is None:
        return None
    model.knowledge = load_memory(memory, model, device)
    model.knowledge_mode = mode
    return {"dir": str(memory), "mode": mode,
            "layers": {layer: int(store.counts[0]) for layer, store in model.knowledge.items()}}


def run(argv: list[str]) -> int:
    args = tyro.cli(EvalCommand, args=argv, prog="memlm eval",
                    description="Bits per byte and perplexity of a trained model on a split, or its long-range "
                                "recall accuracy by distance (--task recall).")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise UsageError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.task == "recall":
        check_recall_options(args)
    if args.memory_multiplier is not None and args.memory_multiplier <= 0:
        raise UsageError(f"--memory-multiplier must be positive, got {args.memory_multiplier}")
    device = pick_device(args.device)
    model, saved = load_model(args.path, device, args.memory_multiplier)
    train_config = saved["train"]
    memory = attach_memory(model, args.memory, device, args.memory_mode)
    if args.task == "recall":
        if load_tokenizer(args.path, saved).kind != "byte":
            raise UsageError("--task recall writes its documents as byte ids: the model must use the byte tokenizer")
        result = eval_recall(model, args, device, train_config.get("precision", "auto"))
    else:
        data = args.data or train_config["data"]
        corpus = prepare(data, train_config.get("cache_dir"), train_config.get("fractions", (0.98, 0.01, 0.01)),
                         tokenizer=load_tokenizer(args.path, saved))  # the run's, on any --data
        batch_size = args.batch_size or train_config["batch_size"]
        with autocast(device, train_config.get("precision", "auto")):
            result = evaluate(model, corpus.split(args.split), batch_size, model.config.seq_len, args.max_tokens,
                              stateful=model.config.stateful, reset=model.config.memory.reset_at_document)
        if not math.isfinite(result["bpb"]):
            raise UsageError(f"{args.split} bpb is {result['bpb']}, not a score: the model's outputs are not finite "
                             f"(are its weights? {find(args.path)})")
        result = {"checkpoint": str(find(args.path)), "data": data, "split": args.split,
                  "memory_lengths": model.config.memory_lengths(training=False), **result}
        print(f"{args.split} bpb {result['bpb']:.4f} | loss {result['loss']:.4f} nats | perplexity "
              f"{result['perplexity']:.4f} | {result['tokens']:,} tokens, {result['bytes']:,} bytes | "
              f"{result['checkpoint']}")
        print(position_table(result["by_position"]))
    if memory is not None:
        result["memory"] = memory
        print(f"knowledge memory {memory['dir']}: " + ", ".join(
            f"layer {layer} {entries:,} entries" for layer, entries in memory["layers"].items()))
    spans = model.spans()
    if spans is not None:
        result["spans"] = spans
        print(spans_table(spans))
    if args.json:
        print(json.dumps(result))
    return 0


def check_recall_options(args: EvalCommand) -> None:
    if not args.distances or min(args.distances) < 0:
        raise UsageError(f"--distances must be one or more byte counts >= 0, got {list(args.distances)}")
    if args.documents < 1 or args.pairs < 1:
        raise UsageError(f"--documents and --pairs must be >= 1, got {args.documents} and {args.pairs}")
    if args.pairs > 10 ** 4:
        raise UsageError(f"--pairs {args.pairs}: a document holds at most 10,000 distinct keys (4 digits each)")
    if args.no_memory and args.memory is not None:
        raise UsageError("--no-memory scores without any memory, so --memory would be ignored: drop one of them")


def eval_recall(model: LanguageModel, args: EvalCommand, device: torch.device, precision: str) -> dict:
    """The recall task (memlm.tasks) through the CLI: prints its markdown table."""
    with autocast(device, precision):
        result = recall_accuracy(model, args.distances, args.documents, args.batch_size or 16, args.seed,
                                 stateful=False if args.no_memory else None, pairs=args.pairs)
    print(recall_markdown(result))
    return {"checkpoint": str(find(args.path)), **result}


def spans_table(spans: list[list[float]]) -> str:
    """Learned adaptive spans (positions), one line per layer, one column per head."""
    heads = len(spans[0]) if spans else 0
    lines = ["adaptive span (positions) by layer and head",
             "layer " + "".join(f"{f'head {h}':>10}" for h in range(heads)) + f"{'mean':>10}"]
    for layer, row in enumerate(spans):
        lines.append(f"{layer:<6}" + "".join(f"{v:>10.1f}" for v in row) + f"{sum(row) / len(row):>10.1f}")
    return "\n".join(lines)


def position_table(rows: list[dict]) -> str:
    """bpb by position within the document, one line per bucket."""
    lines = ["position in document      bpb     tokens"]
    for row in rows:
        span = f"{row['from']:,}-{row['to']:,}" if row["to"] is not None else f"{row['from']:,}+"
        bpb = f"{row['bpb']:.4f}" if row["bpb"] is not None else "   -  "
        lines.append(f"{span:<22} {bpb:>8} {row['tokens']:>10,}")
    return "\n".join(lines)
