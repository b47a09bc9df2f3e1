"""`memlm.from_pretrained(OUT)`: an exported directory back into a memlm LanguageModel, without
transformers (config.json's nested `memlm` dict and model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from memlm.config import ModelConfig
from memlm.hf.layout import CONFIG, MODEL_TYPE, PREFIX, WEIGHTS
from memlm.model import LanguageModel


class ExportError(Exception):
    """A missing or unreadable export directory, or one that cannot be written (one line for the user)."""


def from_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
    """The LanguageModel (eval mode, on `device`) of a directory written by `memlm export --hf`."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG, directory / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ExportError(f"{directory} is no exported memlm model (expected {CONFIG} and {WEIGHTS} there)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {config_file}: {e}") from None
    if config.get("model_type") != MODEL_TYPE or not isinstance(config.get("memlm"), dict):
        raise ExportError(f"{config_file} is not the config of an exported memlm model "
                          f"(model_type {config.get('model_type')!r}, no nested `memlm` config)")
    model = LanguageModel(ModelConfig.from_dict(config["memlm"]))
    try:
        weights = safetensors.torch.load_file(str(weights_file), device=str(device))
    except (OSError, safetensors.SafetensorError) as e:
        raise ExportError(f"cannot read {weights_file}: {e}") from None
    state = {name[len(PREFIX):]: tensor for name, tensor in weights.items() if name.startswith(PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"{weights_file} does not fit its config: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval()
