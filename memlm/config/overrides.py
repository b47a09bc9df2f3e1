"""Dotted overrides of a ModelConfig: `{"attention.kv_heads": 1, "memory.knn.k": 8}`.

Strings are converted to the field's type, so CLI text works too ("1", "true", "none",
"[0, 2]"). A name that is not a field is a ConfigError listing the fields at that level; an
old flat memory name (`memory.knn_k`) says where the field moved.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from memlm.config.checks import ConfigError
from memlm.config.io import LEGACY_MEMORY_FIELDS, from_dict, to_dict


def apply_overrides(config, overrides: dict[str, Any]):
    """Apply `{"attention.kv_heads": 1, "layers": 2}` (also `attention__kv_heads`) to a copy and validate it."""
    from memlm.config.model import ModelConfig
    data = to_dict(config)
    for raw_key, value in overrides.items():
        path = raw_key.replace("__", ".").split(".")
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _set_path(data, path + sub_key.replace("__", ".").split("."), sub_value, ModelConfig)
        else:
            _set_path(data, path, value, ModelConfig)
    return from_dict(data).validate()


def _set_path(data: dict, path: list[str], value: Any, cls: type) -> None:
    dotted = ".".join(path)
    node, node_cls = data, cls
    for i, key in enumerate(path):
        hints = typing.get_type_hints(node_cls)
        if key not in hints:
            moved = LEGACY_MEMORY_FIELDS.get(key) if path[:i] == ["memory"] else None
            if moved:
                raise ConfigError(dotted, value, f"this field moved to memory.{'.'.join(moved)}")
            known = ", ".join(sorted(f.name for f in dataclasses.fields(node_cls)))
            raise ConfigError(dotted, value, f"unknown field; known at this level: {known}")
        if i == len(path) - 1:
            if dataclasses.is_dataclass(hints[key]):
                raise ConfigError(dotted, value, f"{dotted} is a section; set one of its fields "
                                                 f"({', '.join(f.name for f in dataclasses.fields(hints[key]))})")
            node[key] = coerce(dotted, value, hints[key])
        else:
            if not dataclasses.is_dataclass(hints[key]):
                raise ConfigError(dotted, value, f"{'.'.join(path[:i + 1])} is not a section")
            node, node_cls = node[key], hints[key]


def coerce(name: str, value: Any, hint: Any) -> Any:
    """value converted to the field type `hint` when it is a string (CLI text)."""
    if not isinstance(value, str):
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and value.lower() in ("none", "null"):
        return None
    for option in options:
        if typing.get_origin(option) is list:
            try:
                return [int(v) for v in value.strip("[] ").split(",") if v.strip()]
            except ValueError:
                continue
        if option is bool:
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
        elif option in (int, float):
            try:
                return option(value)
            except ValueError:
                continue
        elif option is str:
            return value
    raise ConfigError(name, value, f"expected {hint}")
