"""Attention patterns per layer: a schedule of named patterns, each a `kernels.attention` mask.

Every pattern is causal. For a query at position p and a key at position k <= p, with
W = attention_window, G = attention_global, S = attention_stride, C = attention_chunk:

  dense         every k <= p
  sliding       p - k < W                      (Mistral, Gemma 2/3 local layers)
  local_global  p - k < W or k < G             (Longformer/BigBird causal: G global sink tokens)
  strided       p - k < S or (p - k) % S == 0  (Sparse Transformer, Child et al. 2019)
  dilated       p - k < W and (p - k) % S == 0 (Longformer dilated window: every S-th key)
  chunked       p // C == k // C               (Llama 4: causal within chunks of C tokens)
  nsa           learned: compressed blocks + the top-n selected blocks + a window of W
                (llm/model/nsa.py; its mask here is the window branch's)

Positions are indices in the (packed) training row, as the kernels see them: global tokens and
chunks are those of the row, and packed documents are still separated by segment ids.

Schedule syntax (`config.model.attention_pattern`): comma-separated pattern names, each
optionally followed by `*N` to repeat it N times; the schedule is repeated over the layers, so its
length must divide num_layers. Examples for 12 layers:
  "dense"              all layers dense
  "sliding"            all layers sliding window
  "sliding*5,dense"    Gemma 2/3's 5 local : 1 global (layers 5 and 11 dense)
  "sliding,dense"      alternating, layer 0 sliding

A pattern is one row of PATTERNS: its mask (handed to the kernels, which skip empty blocks; the
KV-cache decode applies the same mask's predicate), the exact number of keys each query position
sees (for llm.science.flops), and the config fields it reads (validated here). Adding a pattern
is adding a row; the learned one ("nsa") is a different layer (llm.model.nsa), which the
Transformer's Block builds when a layer's pattern names it.

This module is the only one that parses a schedule: `Sizes.layer_patterns` holds the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from kernels.attention import masks as m
from llm.errors import ConfigError, check, is_int


class Sizes(Protocol):
    """The model config fields the patterns read (llm.model.config.Sizes has them)."""

    attention_window: int
    attention_global: int
    attention_stride: int
    attention_chunk: int
    attention_nsa_block: int
    attention_nsa_selected: int


@dataclasses.dataclass(frozen=True)
class Pattern:
    """mask(cfg): the kernels mask; visible(cfg, p): keys seen by queries at positions p (int64[N])."""

    mask: Callable[[Sizes], m.Mask]
    visible: Callable[[Sizes, np.ndarray], np.ndarray]
    fields: tuple[str, ...]  # the config.model fields the pattern reads


def _local_global_visible(c: Sizes, p: np.ndarray) -> np.ndarray:
    # The window, plus the global keys k < G that lie before it (k <= p - W).
    return np.minimum(p + 1, c.attention_window) + np.clip(
        p - c.attention_window + 1, 0, c.attention_global
    )


PATTERNS: dict[str, Pattern] = {
    "dense": Pattern(lambda c: m.CausalMask(), lambda c, p: p + 1, ()),
    "sliding": Pattern(
        lambda c: m.SlidingWindowMask(c.attention_window),
        lambda c, p: np.minimum(p + 1, c.attention_window),
        ("attention_window",),
    ),
    "local_global": Pattern(
        lambda c: m.LocalGlobalMask(c.attention_window, c.attention_global) & m.CausalMask(),
        _local_global_visible,
        ("attention_window", "attention_global"),
    ),
    "strided": Pattern(
        lambda c: (
            (m.SlidingWindowMask(c.attention_stride) | m.StridedMask(c.attention_stride))
            & m.CausalMask()
        ),
        lambda c, p: np.minimum(p + 1, c.attention_stride) + p // c.attention_stride,
        ("attention_stride",),
    ),
    "dilated": Pattern(
        lambda c: m.SlidingWindowMask(c.attention_window) & m.StridedMask(c.attention_stride),
        lambda c, p: np.minimum(p, c.attention_window - 1) // c.attention_stride + 1,
        ("attention_window", "attention_stride"),
    ),
    "chunked": Pattern(
        lambda c: m.ChunkedMask(c.attention_chunk) & m.CausalMask(),
        lambda c, p: p % c.attention_chunk + 1,
        ("attention_chunk",),
    ),
    "nsa": Pattern(
        lambda c: m.SlidingWindowMask(c.attention_window),
        lambda c, p: _nsa_visible(c, p),
        ("attention_window", "attention_nsa_block", "attention_nsa_selected"),
    ),
}


def _nsa_visible(c: Sizes, p: np.ndarray) -> np.ndarray:
    return nsa_visible(p, c.attention_nsa_block, c.attention_nsa_selected, c.attention_window)


def nsa_visible(t: np.ndarray, block: int, num_selected: int, window: int) -> np.ndarray:
    """Keys the "nsa" query at position t scores, summed over its three branches (int64 like t).

    Query t (in block i = t // block) scores (t + 1) // block compressed keys, the
    min(num_selected, i) * block tokens of its selected past blocks plus the t - i * block + 1
    tokens of its own block up to itself, and min(window, t + 1) window keys.
    """
    i = t // block
    compressed = (t + 1) // block
    selected = np.minimum(num_selected, i) * block + (t - i * block + 1)
    return compressed + selected + np.minimum(window, t + 1)


def parse_schedule(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """ "sliding*2,dense" -> ("sliding", "sliding", "dense"); a tuple/list is taken as parsed.

    Raises ValueError naming the first malformed entry or unknown pattern.
    """
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for entry in entries:
        name, _, count = entry.strip().partition("*")
        name = name.strip()
        if name not in PATTERNS:
            raise ValueError(
                f"unknown attention pattern {name!r}; the patterns are {sorted(PATTERNS)}"
            )
        if count and not (count.strip().isdigit() and int(count) > 0):
            raise ValueError(
                f"{entry.strip()!r}: the repeat count after '*' must be a positive integer"
            )
        names.extend([name] * (int(count) if count else 1))
    return tuple(names)


def repeat_over_layers(schedule: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """The pattern of each of num_layers layers: the schedule repeated (its length divides them)."""
    if num_layers % len(schedule):
        raise ValueError(
            f"the attention schedule has {len(schedule)} entries, which does not divide "
            f"num_layers={num_layers}"
        )
    return schedule * (num_layers // len(schedule))


def visible_pairs(cfg: Sizes, seq_len: int) -> tuple[int, ...]:
    """Per layer, the exact number of (query, key) pairs a sequence of seq_len tokens attends."""
    p = np.arange(seq_len, dtype=np.int64)
    return tuple(int(PATTERNS[name].visible(cfg, p).sum()) for name in cfg.layer_patterns)


def layer_mask(cfg: Sizes, layer: int | None) -> m.Mask:
    """The kernels mask of `layer`; None (scanned layers share one block: a uniform schedule)
    takes layer 0's."""
    return PATTERNS[cfg.layer_patterns[layer or 0]].mask(cfg)


# The smallest valid value of each size field the patterns read.
MINIMUMS = {
    "attention_window": 1,
    "attention_global": 0,
    "attention_stride": 1,
    "attention_chunk": 1,
    "attention_nsa_block": 1,
    "attention_nsa_selected": 0,
}


def fields_read(schedule: tuple[str, ...]) -> list[str]:
    """The config.model fields the patterns of `schedule` read, sorted."""
    return sorted({f for name in schedule for f in PATTERNS[name].fields})


def validate(sizes: Sizes) -> tuple[str, ...]:
    """The schedule parses, repeats evenly over the layers, suits scanned layers, and the sizes
    its patterns read are valid (before `layer_patterns` is set). Returns the parsed schedule;
    raises ConfigError naming the config.model field."""
    spec, num_layers = sizes.attention_pattern, sizes.num_layers
    try:
        schedule = parse_schedule(spec)
    except ValueError as e:
        raise ConfigError(
            f"config.model.attention_pattern={spec!r}: {e}. Write pattern names separated by "
            'commas, each optionally repeated with "*N", e.g. "sliding*5,dense".'
        ) from None
    check(
        num_layers % len(schedule) == 0,
        f"config.model.attention_pattern={spec!r} has {len(schedule)} entries, which does not "
        f"divide config.model.num_layers={num_layers}: the schedule repeats over the layers; give "
        f"it a length dividing {num_layers} (or set num_layers to a multiple of "
        f"{len(schedule)}).",
    )
    check(
        not sizes.scan_layers or len(set(schedule)) == 1,
        f"config.model.scan_layers=True compiles one block for every layer, but "
        f"config.model.attention_pattern={spec!r} mixes {sorted(set(schedule))}: set "
        "--config.model.scan_layers=False or use a single pattern.",
    )
    for field in fields_read(schedule):
        minimum, value = MINIMUMS[field], getattr(sizes, field)
        check(
            is_int(value) and value >= minimum,
            f"config.model.{field} must be an integer >= {minimum}, got {value!r}: set "
            f"--config.model.{field}=N.",
        )
    if "dilated" in schedule:
        check(
            sizes.attention_stride < sizes.attention_window,
            f"config.model.attention_stride={sizes.attention_stride} must be smaller than "
            f'config.model.attention_window={sizes.attention_window} for "dilated" (else a '
            "query sees only itself): lower the stride or widen the window.",
        )
    return schedule


def validate_fits(sizes: Sizes, seq_len: int) -> None:
    """A pattern's window, chunk, stride or global tokens fit in the trained sequence."""
    spec = sizes.attention_pattern
    for field in fields_read(sizes.layer_patterns):
        size = getattr(sizes, field)
        limit = seq_len - 1 if field == "attention_global" else seq_len
        check(
            size <= limit,
            f"config.model.{field}={size} does not fit in config.seq_len={seq_len} (the attention "
            f"pattern {spec!r} would be dense or degenerate): set "
            f"--config.model.{field} to at most {limit}, or use attention_pattern=dense.",
        )
