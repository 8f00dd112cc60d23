"""The error a user's config mistake raises, and the helpers each validation rule is written with.

Every rule lives in the module whose behaviour it protects; `llm.config` only calls them. An
entry point prints a ConfigError as one line and exits with status 2.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config mistake; the message names the field and the fix."""


def check(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(value: Any, name: str) -> None:
    """`value` of config field `name` ("model.num_layers") is a positive integer."""
    check(
        is_int(value) and value > 0,
        f"config.{name} must be a positive integer, got {value!r}: set --config.{name}=N.",
    )
