"""Test helper: a config with some fields changed."""

from typing import Any


def overridden(config, fields: dict[str, Any]):
    """A copy of `config` with dotted fields ("model.num_heads") set, bypassing validation."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for dotted, value in fields.items():
            *parents, name = dotted.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[name] = value
    return config
