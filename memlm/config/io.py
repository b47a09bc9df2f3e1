"""A ModelConfig to and from plain dicts, JSON and TOML, and the converter for older configs.

TOML is written by tomli-w (None values are left out: TOML has no null, and every field that
may be None defaults to None). Configs written before the memory sections existed (flat
`memory.knn_k`, `memory.length`, ...) load through `upgrade`, which moves each old field to its
section; a field that is neither old nor new is a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

import tomli_w

from memlm.config.checks import ConfigError

LEGACY_MEMORY_FIELDS: dict[str, tuple[str, str]] = {
    "length": ("xl", "length"), "lengths": ("xl", "lengths"), "schedule": ("xl", "schedule"),
    "min_length": ("xl", "min_length"), "eval_multiplier": ("xl", "eval_multiplier"),
    "feedback": ("feedback", "mode"), "persistent": ("persistent", "vectors"),
    "adaptive_span": ("adaptive_span", "enabled"), "span_max": ("adaptive_span", "max"),
    "span_ramp": ("adaptive_span", "ramp"), "span_init": ("adaptive_span", "init"),
    "span_penalty": ("adaptive_span", "penalty"),
    "compress_rate": ("compressive", "rate"), "compress_length": ("compressive", "length"),
    "compress_fn": ("compressive", "fn"), "compress_loss": ("compressive", "loss_weight"),
    "tokens": ("tokens", "count"), "tokens_recurrent": ("tokens", "recurrent"),
    "knn_layers": ("knn", "layers"), "knn_k": ("knn", "k"), "knn_capacity": ("knn", "capacity"),
    "knn_backend": ("knn", "backend"), "knn_dtype": ("knn", "dtype"), "knn_combine": ("knn", "combine"),
    "knn_straight_through": ("knn", "straight_through"),
}
"""Flat memory field of configs before the sections -> (section, field)."""


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with any flat (pre-section) memory fields moved into their sections."""
    memory = data.get("memory")
    if not isinstance(memory, dict) or not any(
            key in LEGACY_MEMORY_FIELDS and not isinstance(value, dict) for key, value in memory.items()):
        return data
    new_memory: dict[str, Any] = {}
    for key, value in memory.items():
        if key in LEGACY_MEMORY_FIELDS and not isinstance(value, dict):
            section, name = LEGACY_MEMORY_FIELDS[key]
            new_memory.setdefault(section, {})[name] = value
        else:
            new_memory[key] = value
    return {**data, "memory": new_memory}


def from_dict(data: dict[str, Any]):
    from memlm.config.model import ModelConfig
    return _build(ModelConfig, upgrade(data), prefix="")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", data, "must be a table/dict")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(prefix + key, value, f"unknown field; known: {', '.join(sorted(names))}")
        hint = hints[key]
        kwargs[key] = _build(hint, value, prefix + key + ".") if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: without_none(value) if isinstance(value, dict) else value
            for key, value in data.items() if value is not None}


def to_toml(data: dict[str, Any]) -> str:
    return tomli_w.dumps(without_none(data))


def save(config, path: str | Path) -> None:
    """Write the config as JSON (.json) or TOML (.toml; None values are left out)."""
    path = Path(path)
    if path.suffix == ".toml":
        path.write_text(to_toml(to_dict(config)))
    else:
        path.write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load(path: str | Path):
    path = Path(path)
    text = path.read_text()
    return from_dict(tomllib.loads(text) if path.suffix == ".toml" else json.loads(text))
