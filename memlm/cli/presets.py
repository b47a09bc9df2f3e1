"""`memlm presets`: the model presets with their parameter counts."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import tyro

from memlm.config import ModelConfig, describe, get_preset, presets
from memlm.model import LanguageModel


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


def run(argv: list[str]) -> int:
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
