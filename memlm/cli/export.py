"""`memlm export RUN --hf OUT`: a trained model as a Hugging Face model directory (memlm.hf)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from memlm.cli.common import RunPath, UsageError
from memlm.hf import export_run


@dataclass
class ExportCommand:
    path: RunPath
    """Run directory (its checkpoints/latest, or --checkpoint best) or checkpoint directory."""
    hf: Path | None = None
    """Write a Hugging Face model directory here: config.json, model.safetensors, the remote code
    (load with trust_remote_code=True; it imports memlm), the byte tokenizer, generation_config.json
    and a model card. An earlier export there is replaced."""
    checkpoint: Literal["latest", "best"] = "latest"
    """Which checkpoint of a run directory to export."""


def run(argv: list[str]) -> int:
    args = tyro.cli(ExportCommand, args=argv, prog="memlm export",
                    description="Export a trained model: --hf OUT writes a Hugging Face model directory.")
    if args.hf is None:
        raise UsageError("say what to export to: --hf OUT (a Hugging Face model directory)")
    out = export_run(args.path, args.hf, args.checkpoint)
    print(f"exported {args.path} to {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          f"trust_remote_code=True), or memlm.from_pretrained)")
    return 0
