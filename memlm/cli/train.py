"""`memlm train`: a preset plus --model.* changes trained on a corpus (memlm.train)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

import tyro

from memlm.config import ModelConfig, get_preset
from memlm.device import pick_device
from memlm.train import TrainConfig, train


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


def run(argv: list[str]) -> int:
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
