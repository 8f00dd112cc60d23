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
                (llm/native_sparse.py; its mask here is the window branch's)

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
sees (for llm.flops), and the config fields it reads (for llm.config validation). Adding a pattern
is adding a row; the learned one ("nsa") is a different layer, which llm.model's Block builds
when `layer_pattern` names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from kernels.attention import masks as m

if TYPE_CHECKING:
    from llm.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Pattern:
    """mask(cfg): the kernels mask; visible(cfg, p): keys seen by queries at positions p (int64[N])."""

    mask: Callable[[ModelConfig], m.Mask]
    visible: Callable[[ModelConfig, np.ndarray], np.ndarray]
    fields: tuple[str, ...]  # the config.model fields the pattern reads


def _local_global_visible(c: ModelConfig, p: np.ndarray) -> np.ndarray:
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


def _nsa_visible(c: ModelConfig, p: np.ndarray) -> np.ndarray:
    from llm.native_sparse import nsa_visible  # llm.native_sparse builds on llm.model

    return nsa_visible(p, c.attention_nsa_block, c.attention_nsa_selected, c.attention_window)


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


def layer_patterns(cfg: ModelConfig) -> tuple[str, ...]:
    """The pattern name of each of the cfg.num_layers layers (the schedule repeated)."""
    schedule = parse_schedule(cfg.attention_pattern)
    if cfg.num_layers % len(schedule):
        raise ValueError(
            f"the attention schedule has {len(schedule)} entries, which does not divide "
            f"num_layers={cfg.num_layers}"
        )
    return schedule * (cfg.num_layers // len(schedule))


def layer_pattern(cfg: ModelConfig, layer: int | None) -> str:
    """The pattern name of `layer`; layer=None (scanned layers share one block) needs a uniform
    schedule."""
    names = layer_patterns(cfg)
    if layer is None:
        if len(set(names)) > 1:
            raise ValueError(
                f"scan_layers=True compiles one block for all layers, but the attention schedule "
                f"{cfg.attention_pattern!r} mixes patterns {sorted(set(names))}"
            )
        layer = 0
    return names[layer]


def layer_mask(cfg: ModelConfig, layer: int | None) -> m.Mask:
    """The mask of `layer` (see `layer_pattern`)."""
    return PATTERNS[layer_pattern(cfg, layer)].mask(cfg)


def visible_pairs(cfg: ModelConfig, seq_len: int) -> tuple[int, ...]:
    """Per layer, the exact number of (query, key) pairs a sequence of seq_len tokens attends."""
    p = np.arange(seq_len, dtype=np.int64)
    return tuple(int(PATTERNS[name].visible(cfg, p).sum()) for name in layer_patterns(cfg))
