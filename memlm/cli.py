"""The `memlm` command: train, eval, generate, memorize, presets, bench, race.

    memlm train [--preset P] [--data SRC] [--out DIR] [--steps N | --tokens N | --minutes M] [--resume]
                [--model.attention.kv_heads 1 ...]      (every TrainConfig field and --model.<ModelConfig field>)
    memlm eval RUN_OR_CKPT [--data SRC] [--split test] [--memory MEMDIR] [--json]
    memlm eval RUN_OR_CKPT --task recall [--distances 64 256 1024 4096 --documents 64 --pairs 1 --seed 0
                                          --no-memory]     (long-range recall, memlm.tasks; no corpus)
    memlm generate RUN_OR_CKPT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
                               [--memory MEMDIR]
    memlm memorize RUN_OR_CKPT --out MEMDIR [--data SRC --split train --max-tokens N --batch-size B
                                             --capacity C]  (knowledge memory for kNN layers, memlm.memorize)
    memlm presets [--json]
    memlm race [--contenders A B ...] [--minutes M | --steps N] [--devices cuda:0 ... | --only NAME | --contender-index I]
               [TrainConfig options]
    memlm race merge FILES...                  (memlm_bench.race: contenders trained for one budget, test bpb)

argparse picks the command; tyro parses its options from a dataclass, so the help texts are
the config fields' docstrings. `memlm train` reads --preset (and --device) first: the preset
gives the defaults of every --model.* option. `--json` prints one JSON object as the last
line of stdout. Mistakes of the user (a bad config value, a missing corpus, run directory or
checkpoint) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
import tyro

from memlm.config import ConfigError, ModelConfig, describe, get_preset, presets
from memlm.data import DataError, prepare
from memlm.eval import evaluate
from memlm.tasks import DISTANCES, recall_accuracy, recall_markdown
from memlm.memorize import KnowledgeError, check_target, load_memory, memorize, save_memory
from memlm.memory.knn.stores import StoreError
from memlm.model import LanguageModel
from memlm.train import CheckpointError, TrainConfig, TrainingError, load_model, train
from memlm.train.lock import RunDirectoryBusy
from memlm.train.checkpoint import find
from memlm.device import autocast, pick_device
from memlm.train.sample import sample_text


class UsageError(Exception):
    """A bad command-line value that no config class checks."""


FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""OSErrors that are the machine's state, not a bug: one line and exit 2 (no space, read-only, no permission)."""
USER_ERRORS = (ConfigError, DataError, CheckpointError, UsageError, KnowledgeError, StoreError, TrainingError,
               RunDirectoryBusy)
RunPath = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_OR_CKPT")]


# ----- train ------------------------------------------------------------------------------

@dataclass
class TrainCommand(TrainConfig):
    preset: str | None = None
    """Model preset (see `memlm presets`); None = seed-tiny on CPU, seed-small on CUDA. It sets the --model.* defaults."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: the preset's config with any --model.* option changed."""
    json: bool = False
    """Print the run's summary as one JSON object on the last line."""


def default_preset(device: str) -> str:
    """The main job's model: seed-small on CUDA, seed-tiny on CPU."""
    return "seed-small" if pick_device(device).type == "cuda" else "seed-tiny"


def cmd_train(argv: list[str]) -> int:
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset")
    early.add_argument("--device", default="auto")
    known, _ = early.parse_known_args(argv)
    preset = known.preset or default_preset(known.device)
    args = tyro.cli(TrainCommand, args=argv, prog="memlm train", use_underscores=True,
                    default=TrainCommand(preset=preset, model=get_preset(preset)),
                    description="Train a model (a preset plus --model.* changes) on a corpus; see the run directory.")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    summary = train(args.model.validate(), config, preset=args.preset)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    weights = (f" with the best validation's weights (step {summary['test_step']:,})"
               if summary["test_weights"] == "best" else "")
    print(f"test bpb {summary['test_bpb']:.4f} ({summary['test_tokens']:,} tokens{weights}) after "
          f"{summary['steps']:,} steps, {summary['tokens']:,} training tokens, {summary['elapsed_s']:.0f} s")
    print(f"sample:\n{summary['sample']}\n")
    print(f"run directory: {summary['run_dir']}")
    if args.json:
        print(json.dumps(summary))
    return 0


# ----- eval -------------------------------------------------------------------------------

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


def cmd_eval(argv: list[str]) -> int:
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
        result = eval_recall(model, args, device, train_config.get("precision", "auto"))
    else:
        data = args.data or train_config["data"]
        corpus = prepare(data, train_config.get("cache_dir"), train_config.get("fractions", (0.98, 0.01, 0.01)))
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
              f"{result['perplexity']:.4f} | {result['tokens']:,} tokens | {result['checkpoint']}")
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


# ----- bench ------------------------------------------------------------------------------

def cmd_bench(argv: list[str]) -> int:
    from memlm_bench import main as bench_main
    return bench_main(argv)


# ----- race -------------------------------------------------------------------------------

def cmd_race(argv: list[str]) -> int:
    from memlm_bench.race import main as race_main
    return race_main(argv)


# ----- generate ---------------------------------------------------------------------------

@dataclass
class GenerateCommand:
    path: RunPath
    """Run directory (its checkpoints/latest) or checkpoint directory."""
    prompt: str = ""
    """Text to continue; it follows an end-of-document token, i.e. it starts a document."""
    max_new_tokens: int = 256
    """Bytes (tokens) to generate."""
    temperature: float = 0.8
    """Sampling temperature; 0 = greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens only."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens with probability >= top_p."""
    seed: int = 0
    """Sampling seed (the same seed gives the same text)."""
    memory: str | None = None
    """Knowledge memory directory (memlm memorize), read-only, read by every row's kNN layers."""
    memory_mode: Literal["fill", "add", "replace"] = "fill"
    """How the kNN layers read the knowledge memory beside their own stream's past: fill (the slots
    the own past leaves empty, e.g. at a document's start), add (the best k of both by score), or
    replace (the knowledge memory only)."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    json: bool = False
    """Print {"prompt", "completion", "ids", "new_tokens"} as one JSON object on the last line."""


def cmd_generate(argv: list[str]) -> int:
    args = tyro.cli(GenerateCommand, args=argv, prog="memlm generate",
                    description="Continue a prompt with a trained model.")
    if args.max_new_tokens < 0 or not args.temperature >= 0 or math.isinf(args.temperature):
        raise UsageError(f"--max-new-tokens and --temperature must be finite and >= 0, got {args.max_new_tokens} "
                         f"and {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k must be positive, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], got {args.top_p}")
    device = pick_device(args.device)
    model, saved = load_model(args.path, device)
    attach_memory(model, args.memory, device, args.memory_mode)
    with autocast(device, saved["train"].get("precision", "auto")):
        text, ids = sample_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                args.seed)
    print(args.prompt + text)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "ids": ids, "new_tokens": len(ids)}))
    return 0


# ----- memorize ---------------------------------------------------------------------------

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


def cmd_memorize(argv: list[str]) -> int:
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
    corpus = prepare(data, train_config.get("cache_dir"), fractions)
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


# ----- presets ----------------------------------------------------------------------------

@dataclass
class PresetsCommand:
    json: bool = False
    """Print the list as one JSON array on the last line."""


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a config's model, counted on the meta device (no memory, no init) when its
    modules allow it, else on the CPU (an init that reads tensor values needs real ones)."""
    try:
        with torch.device("meta"):
            return LanguageModel(config).num_parameters()
    except (RuntimeError, NotImplementedError):
        return LanguageModel(config).num_parameters()


def cmd_presets(argv: list[str]) -> int:
    args = tyro.cli(PresetsCommand, args=argv, prog="memlm presets", description="The model presets.")
    rows = []
    for name in presets():
        config = get_preset(name)
        parameters = count_parameters(config)
        shape = f"{config.layers} layers x {config.width} wide, {config.attention.heads} heads, seq {config.seq_len}"
        rows.append({"name": name, "parameters": parameters, "description": f"{describe(name)} ({shape})"})
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['parameters'] / 1e6:7.2f}M  {r['description']}")
    if args.json:
        print(json.dumps(rows))
    return 0


# ----- dispatch ---------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (cmd_train, "train a model (default: the main job, seed-tiny for 3 minutes on CPU)"),
    "eval": (cmd_eval, "bits per byte of a trained model on a split, or --task recall"),
    "generate": (cmd_generate, "continue a prompt with a trained model"),
    "memorize": (cmd_memorize, "save what a kNN model's memory layers write over a corpus (knowledge memory)"),
    "presets": (cmd_presets, "list the model presets"),
    "bench": (cmd_bench, "training and generation speed against a reference GPT and peers"),
    "race": (cmd_race, "contenders trained for the same budget by memlm's loop, test bpb table; race merge FILES"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memlm` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="memlm", description="Byte-level transformer language models with long-range memory.",
        epilog="\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`memlm COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="train, eval, generate, memorize, presets, bench or race")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[parsed.command][0](parsed.args)
    except USER_ERRORS as e:
        print(f"memlm {parsed.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRORS:
            raise
        print(f"memlm {parsed.command}: error: {e.strerror}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memlm {parsed.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
