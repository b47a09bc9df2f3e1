"""The `memlm` command: train, eval, generate, memorize, presets, lm-eval, export, serve, bench, race, ablate.

    memlm train [--preset P] [--data SRC] [--tokenizer bytes|bpe:N|hf:PATH] [--out DIR]
                [--steps N | --tokens N | --minutes M] [--resume] [--model.attention.kv_heads 1 ...]      (every TrainConfig field and --model.<ModelConfig field>)
    memlm eval RUN_OR_CKPT [--data SRC] [--split test] [--memory MEMDIR] [--json]
    memlm eval RUN_OR_CKPT --task recall [--distances 64 256 1024 4096 --documents 64 --pairs 1 --seed 0
                                          --no-memory]     (long-range recall, memlm.tasks; no corpus)
    memlm generate RUN_OR_CKPT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S]
                               [--memory MEMDIR]
    memlm memorize RUN_OR_CKPT --out MEMDIR [--data SRC --split train --max-tokens N --batch-size B
                                             --capacity C]  (knowledge memory for kNN layers, memlm.memorize)
    memlm presets [--json]
    memlm lm-eval RUN_OR_CKPT_OR_EXPORT --tasks T ... [--include-path DIR --limit N --batch-size B --no-memory]
                                               (lm-evaluation-harness, memlm.lm_eval_harness)
    memlm export RUN_OR_CKPT --hf OUT [--checkpoint latest|best]   (a Hugging Face model directory, memlm.hf)
    memlm serve RUN_OR_CKPT [--host H --port P --max-sessions N --max-session-mb M --max-tokens N --memory MEMDIR]
    memlm race [--contenders A B ...] [--minutes M | --steps N] [--devices cuda:0 ... | --only NAME | --contender-index I]
               [TrainConfig options]
    memlm race merge FILES...                  (memlm_bench.race: contenders trained for one budget, test bpb)
    memlm ablate [--claims ID ...] [--seeds 3] [--shape tiny|small|base] [--minutes M | --tokens N]
                 [--concurrent K] [--devices ...] [--data SPEC] [--out DIR] [--report-only] [--list-claims]
                                               (memlm_bench.ablate: claims x arms x seeds, RESULTS.md)

One module per command (`COMMANDS` names it; it is imported when its command runs) with a
`run(argv) -> int`; bench, race and ablate live in the memlm_bench package (memlm.cli.harness,
memlm.cli.ablate).
argparse picks the command; tyro parses its options from a dataclass, so the help texts are
the config fields' docstrings. `memlm train` reads --preset (and --device) first: the preset
gives the defaults of every --model.* option. `--json` prints one JSON object as the last
line of stdout. Mistakes of the user (a bad config value, a missing corpus, run directory or
checkpoint) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Callable

from memlm.cli.common import UsageError
from memlm.cli.train import default_preset
from memlm.config import ConfigError
from memlm.data import DataError
from memlm.hf import ExportError
from memlm.memorize import KnowledgeError
from memlm.memory.knn.stores import StoreError
from memlm.train import CheckpointError, TrainingError
from memlm.train.lock import RunDirectoryBusy

FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""OSErrors that are the machine's state, not a bug: one line and exit 2 (no space, read-only, no permission)."""
USER_ERRORS = (ConfigError, DataError, CheckpointError, UsageError, KnowledgeError, StoreError, TrainingError,
               RunDirectoryBusy, ExportError)

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("memlm.cli.train:run", "train a model (default: the main job, seed-tiny for 3 minutes on CPU)"),
    "eval": ("memlm.cli.evaluate:run", "bits per byte of a trained model on a split, or --task recall"),
    "generate": ("memlm.cli.generate:run", "continue a prompt with a trained model"),
    "memorize": ("memlm.cli.memorize:run",
                 "save what a kNN model's memory layers write over a corpus (knowledge memory)"),
    "presets": ("memlm.cli.presets:run", "list the model presets"),
    "lm-eval": ("memlm.cli.lm_eval:run",
                "lm-evaluation-harness tasks on a trained model, its memory carried (the eval extra)"),
    "export": ("memlm.cli.export:run", "write a run as a Hugging Face model directory (--hf OUT; memlm.hf)"),
    "serve": ("memlm.cli.serve:run", "OpenAI-compatible completions server whose sessions keep their memory"),
    "bench": ("memlm.cli.harness:bench", "training and generation speed against a reference GPT and peers"),
    "race": ("memlm.cli.harness:race",
             "contenders trained for the same budget by memlm's loop, test bpb table; race merge FILES"),
    "ablate": ("memlm.cli.ablate:run", "the reading list's claims: arms x paired seeds, 95% intervals, RESULTS.md"),
}
"""Command name -> ("module:function" that runs it with its arguments, one-line help)."""

__all__ = ["COMMANDS", "USER_ERRORS", "UsageError", "command", "default_preset", "main"]


def command(name: str) -> Callable[[list[str]], int]:
    """The function that runs command `name` (its module imported now)."""
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memlm` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="memlm", description="Byte-level transformer language models with long-range memory.",
        epilog="\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`memlm COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS,
                        help="train, eval, generate, memorize, presets, export, serve, bench, race or ablate")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parsed = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return command(parsed.command)(parsed.args)
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

