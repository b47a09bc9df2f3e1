"""`memlm generate`: continue a prompt with a trained model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import tyro

from memlm.cli.common import RunPath, UsageError
from memlm.cli.evaluate import attach_memory
from memlm.device import autocast, pick_device
from memlm.train import load_model
from memlm.train.sample import sample_text


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
