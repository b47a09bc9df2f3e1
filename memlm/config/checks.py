"""The error every config check raises, and the small checks the sections share."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value or an impossible combination of values."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name = field_name
        super().__init__(f"invalid config: {field_name}={value!r}; {allowed}")


def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, value, "must be a positive integer")


def non_negative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(name, value, "must be an integer >= 0")


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, f"allowed: {', '.join(allowed)}")


def fraction(name: str, value: Any, closed: bool = False) -> None:
    """value in [0, 1) (closed: [0, 1])."""
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ConfigError(name, value, f"must lie in [0, 1{']' if closed else ')'}")


def layer_list(name: str, value: Any, layers: int) -> None:
    """value: a list of distinct layer indices in [0, layers)."""
    if (not isinstance(value, (list, tuple)) or len(set(value)) != len(value)
            or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers for i in value)):
        raise ConfigError(name, value, f"must be a list of distinct layer indices in [0, {layers - 1}]")
