"""`memlm generate`: continue a prompt with a trained model."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from memlm.cli.common import RunPath, UsageError
from memlm.cli.evaluate import attach_memory
from memlm.device import autocast, pick_device
from memlm.train import load_model, load_tokenizer
from memlm.train.sample import sample_text


@dataclass
class GenerateCommand:
    path: RunPath
    """Run directory (its checkpoints/latest) or checkpoint directory."""
    prompt: str = ""
    """Text to continue; it follows an end-of-document token, i.e. it starts a document."""
    max_new_tokens: int = 256
    """Tokens to generate (bytes with the byte tokenizer)."""
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
    stop: list[str] = dataclasses.field(default_factory=list)
    """Stop strings: the completion ends before the first of them."""
    stop_at_eod: bool = True
    """End the completion at the model's end-of-document token."""
    stream: bool = False
    """Print the completion piece by piece as it is generated."""
    prompts_file: Path | None = None
    """Several prompts, the model loaded once: one per line, or a .jsonl file of {"prompt": ...}
    objects; completions are printed in order (--json: one JSON object per line)."""
    json: bool = False
    """Print {"prompt", "completion", "ids", "new_tokens"} as one JSON object on the last line."""


def run(argv: list[str]) -> int:
    args = tyro.cli(GenerateCommand, args=argv, prog="memlm generate",
                    description="Continue a prompt with a trained model.")
    if args.max_new_tokens < 0 or not args.temperature >= 0 or math.isinf(args.temperature):
        raise UsageError(f"--max-new-tokens and --temperature must be finite and >= 0, got {args.max_new_tokens} "
                         f"and {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k must be positive, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if any(not stop for stop in args.stop):
        raise UsageError("--stop strings must not be empty")
    prompts = read_prompts(args.prompts_file) if args.prompts_file is not None else [args.prompt]
    device = pick_device(args.device)
    model, saved = load_model(args.path, device)
    tokenizer = load_tokenizer(args.path, saved)
    attach_memory(model, args.memory, device, args.memory_mode)
    for prompt in prompts:
        if args.stream:
            print(prompt, end="", flush=True)
        with autocast(device, saved["train"].get("precision", "auto")):
            text, ids = sample_text(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                    args.seed, stop_at_eod=args.stop_at_eod, stop_strings=args.stop,
                                    on_text=(lambda piece: print(piece, end="", flush=True)) if args.stream else None,
                                    tokenizer=tokenizer)
        print() if args.stream else print(prompt + text)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "ids": ids, "new_tokens": len(ids)}))
    return 0


def read_prompts(path: Path) -> list[str]:
    """The prompts of --prompts-file: one per line, or {"prompt": ...} per line of a .jsonl file."""
    if not path.is_file():
        raise UsageError(f"--prompts-file {path}: no such file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UsageError(f"--prompts-file {path}, line {number}: expected {{\"prompt\": ...}} ({error})")
    return prompts
