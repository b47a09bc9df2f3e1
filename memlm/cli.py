"""The `memlm` command: train, eval, generate, presets.

    memlm train [--preset P] [--data SRC] [--out DIR] [--steps N | --tokens N | --minutes M] [--resume]
                [--model.attention.kv_heads 1 ...]      (every TrainConfig field and --model.<ModelConfig field>)
    memlm eval RUN_OR_CKPT [--data SRC] [--split test] [--json]
    memlm generate RUN_OR_CKPT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
    memlm presets [--json]

argparse picks the command; tyro parses its options from a dataclass, so the help texts are
the config fields' docstrings. `memlm train` reads --preset (and --device) first: the preset
gives the defaults of every --model.* option. `--json` prints one JSON object as the last
line of stdout. Mistakes of the user (a bad config value, a missing corpus, run directory or
checkpoint) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Callable

import torch
import tyro

from memlm.config import ConfigError, ModelConfig, describe, get_preset, presets
from memlm.data import DataError, prepare
from memlm.eval import evaluate
from memlm.model import LanguageModel
from memlm.train import CheckpointError, TrainConfig, load_model, train
from memlm.train.checkpoint import find
from memlm.train.distributed import pick_device
from memlm.train.precision import autocast
from memlm.train.sample import sample_text


class UsageError(Exception):
    """A bad command-line value that no config class checks."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, UsageError)
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
    print(f"test bpb {summary['test_bpb']:.4f} ({summary['test_tokens']:,} tokens) after {summary['steps']:,} steps, "
          f"{summary['tokens']:,} training tokens, {summary['elapsed_s']:.0f} s")
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
    data: str | None = None
    """Corpus to evaluate on; None = the run's training corpus."""
    split: str = "test"
    """Split: train, validation or test."""
    batch_size: int | None = None
    """Streams scored in parallel; None = the run's training batch size."""
    max_tokens: int | None = None
    """Score about this many tokens (whole segments of streams spread over the split); None = all of it."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    json: bool = False
    """Print the result as one JSON object on the last line."""


def cmd_eval(argv: list[str]) -> int:
    args = tyro.cli(EvalCommand, args=argv, prog="memlm eval",
                    description="Bits per byte and perplexity of a trained model on a split.")
    device = pick_device(args.device)
    model, saved = load_model(args.path, device)
    train_config = saved["train"]
    data = args.data or train_config["data"]
    corpus = prepare(data, train_config.get("cache_dir"), train_config.get("fractions", (0.98, 0.01, 0.01)))
    batch_size = args.batch_size or train_config["batch_size"]
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    with autocast(device, train_config.get("precision", "auto")):
        result = evaluate(model, corpus.split(args.split), batch_size, model.config.seq_len, args.max_tokens,
                          stateful=model.config.stateful, reset=model.config.memory.reset_at_document)
    result = {"checkpoint": str(find(args.path)), "data": data, "split": args.split, **result}
    print(f"{args.split} bpb {result['bpb']:.4f} | loss {result['loss']:.4f} nats | perplexity "
          f"{result['perplexity']:.4f} | {result['tokens']:,} tokens | {result['checkpoint']}")
    print(position_table(result["by_position"]))
    if args.json:
        print(json.dumps(result))
    return 0


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
    from memlm.bench import main as bench_main
    return bench_main(argv)


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
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    json: bool = False
    """Print {"prompt", "completion", "ids", "new_tokens"} as one JSON object on the last line."""


def cmd_generate(argv: list[str]) -> int:
    args = tyro.cli(GenerateCommand, args=argv, prog="memlm generate",
                    description="Continue a prompt with a trained model.")
    if args.max_new_tokens < 0 or args.temperature < 0:
        raise UsageError("--max-new-tokens and --temperature must be >= 0")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k must be positive, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], got {args.top_p}")
    device = pick_device(args.device)
    model, saved = load_model(args.path, device)
    with autocast(device, saved["train"].get("precision", "auto")):
        text, ids = sample_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                args.seed)
    print(args.prompt + text)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "ids": ids, "new_tokens": len(ids)}))
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
    "eval": (cmd_eval, "bits per byte of a trained model on a split"),
    "generate": (cmd_generate, "continue a prompt with a trained model"),
    "presets": (cmd_presets, "list the model presets"),
    "bench": (cmd_bench, "training and generation speed against a reference GPT and peers"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memlm` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="memlm", description="Byte-level transformer language models with long-range memory.",
        epilog="\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`memlm COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="train, eval, generate, presets or bench")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[parsed.command][0](parsed.args)
    except USER_ERRORS as e:
        print(f"memlm {parsed.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memlm {parsed.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
