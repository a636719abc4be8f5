"""The one error a user sees for a bad config, and the small value checks that raise it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """``key=value: why`` — printed as one line by ``run.py``, which then exits 2."""

    def __init__(self, key: str, value: Any, why: str):
        super().__init__(f"{key}={value}: {why}")
        self.key, self.value, self.why = key, value, why


def value_at(cfg: Any, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def positive_int(cfg: Any, key: str) -> int:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "must be a positive integer")
    return value


def non_negative_int(cfg: Any, key: str) -> int:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "must be a non-negative integer")
    return value


def positive_float(cfg: Any, key: str) -> float:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(key, value, "must be a positive number")
    return float(value)
