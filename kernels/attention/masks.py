"""Composable attention-mask descriptions.

A mask says which (query, key) pairs may attend. Masks are frozen, hashable
dataclasses, so host-side preprocessing (`mask_info.py`) can be cached per
(mask, shape, block sizes).

Positions are absolute: query row i (0 <= i < q_seq) sits at position
``q_pos = i + (kv_seq - q_seq)`` and key column j at ``k_pos = j``. So when
q_seq < kv_seq (decoding, chunked prefill) the last query aligns with the last
key (the FlashAttention 2.1+ convention); when q_seq > kv_seq the first queries
have negative positions.

Each mask offers:
  * ``dense(q_seq, kv_seq) -> np.ndarray[bool] [q_seq, kv_seq]`` on the host:
    the ground truth for tests and the reference implementation.
  * ``predicate(q_pos, k_pos) -> bool array``: elementwise, using only Python
    operators (``+ - // < == & |`` ...), so it works on numpy arrays and on
    jnp int32 arrays inside a Pallas kernel (positions built from iota, q_pos
    already shifted by kv_seq - q_seq). Inputs broadcast against each other.

`BlockSparseMask` is the exception: its predicate is block-granular (always
True), which is exact only in blocks a kernel actually visits when the kernel
blocks are aligned to the layout; see `Mask.kernel_block_error`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

Array = Any  # np.ndarray or jax.Array of int32 positions / bools.


class Mask:
    """Base class of mask descriptions. Supports `|` (union) and `&` (intersection)."""

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        """Elementwise visibility of absolute positions (see module docstring)."""
        raise NotImplementedError

    def host_predicate(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """Exact elementwise visibility on the host (numpy). Defaults to `predicate`."""
        return np.asarray(self.predicate(q_pos, k_pos))

    def validate(self, q_seq: int, kv_seq: int) -> None:
        """Raises ValueError if the mask cannot apply to these sequence lengths."""

    def kernel_block_error(self, block_q: int, block_kv: int) -> str | None:
        """Why `predicate` is not exact in partial kernel blocks of this size, or None."""
        del block_q, block_kv
        return None

    def dense(self, q_seq: int, kv_seq: int) -> np.ndarray:
        """bool[q_seq, kv_seq] with True where query row i may attend key column j."""
        self.validate(q_seq, kv_seq)
        q_pos, k_pos = positions(q_seq, kv_seq)
        return np.broadcast_to(self.host_predicate(q_pos, k_pos), (q_seq, kv_seq)).copy()

    def __or__(self, other: Mask) -> Mask:
        return Union(_flatten(Union, (self, other)))

    def __and__(self, other: Mask) -> Mask:
        return Intersection(_flatten(Intersection, (self, other)))

    @property
    def has_block_sparse(self) -> bool:
        return False


def positions(q_seq: int, kv_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute positions: int32 q_pos [q_seq, 1] (shifted) and k_pos [1, kv_seq]."""
    q_pos = np.arange(q_seq, dtype=np.int32)[:, None] + np.int32(kv_seq - q_seq)
    k_pos = np.arange(kv_seq, dtype=np.int32)[None, :]
    return q_pos, k_pos


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")  # noqa: TRY004 (API: ValueError)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
    """Query at position p sees keys at positions <= p."""

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        return k_pos <= q_pos


@dataclasses.dataclass(frozen=True)
class SlidingWindowMask(Mask):
    """Query at p sees keys in [p - left + 1, p + right].

    `left` counts the query itself: left=W sees itself and the W-1 keys before.
    right=0 (default) sees no future keys, so this already implies causality.
    """

    left: int
    right: int = 0

    def __post_init__(self):
        _check_int("SlidingWindowMask.left", self.left, 1)
        _check_int("SlidingWindowMask.right", self.right, 0)

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        return (q_pos - k_pos < self.left) & (k_pos - q_pos <= self.right)


@dataclasses.dataclass(frozen=True)
class LocalGlobalMask(Mask):
    """Longformer-style local band plus global tokens (bidirectional).

    Query p sees key k iff |p - k| < window, or k < num_global (global keys are
    seen by everyone), or p < num_global (global queries see everything).
    For the causal variant use ``LocalGlobalMask(w, g) & CausalMask()``.
    """

    window: int
    num_global: int

    def __post_init__(self):
        _check_int("LocalGlobalMask.window", self.window, 1)
        _check_int("LocalGlobalMask.num_global", self.num_global, 0)

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        diff = q_pos - k_pos
        local = (diff < self.window) & (-diff < self.window)
        return local | (k_pos < self.num_global) | (q_pos < self.num_global)


@dataclasses.dataclass(frozen=True)
class StridedMask(Mask):
    """Dilated pattern: query p sees key k iff (p//block - k//block) % stride == 0.

    block=1 gives per-token dilation (every stride-th key relative to the
    query, both directions); block>1 gives the same pattern over blocks of
    `block` tokens. Sparse-Transformer "strided" attention is
    ``(SlidingWindowMask(stride) | StridedMask(stride)) & CausalMask()``.
    """

    stride: int
    block: int = 1

    def __post_init__(self):
        _check_int("StridedMask.stride", self.stride, 1)
        _check_int("StridedMask.block", self.block, 1)

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        diff = q_pos // self.block - k_pos // self.block
        # abs() keeps `%` on non-negative operands (floor vs trunc semantics agree).
        return abs(diff) % self.stride == 0


@dataclasses.dataclass(frozen=True)
class ChunkedMask(Mask):
    """Query p sees key k iff both lie in the same chunk of `chunk` positions (p//chunk == k//chunk).

    Bidirectional within a chunk; Llama-4-style chunked causal attention is
    ``ChunkedMask(c) & CausalMask()``.
    """

    chunk: int

    def __post_init__(self):
        _check_int("ChunkedMask.chunk", self.chunk, 1)

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        return q_pos // self.chunk == k_pos // self.chunk


@dataclasses.dataclass(frozen=True)
class BlockSparseMask(Mask):
    """Arbitrary layout at block granularity, over absolute positions.

    layout[r][c] says whether queries at positions [r*block_q, (r+1)*block_q)
    see keys at positions [c*block_k, (c+1)*block_k). The layout must have
    exactly ceil(kv_seq / block_q) rows and ceil(kv_seq / block_k) columns
    (query positions run up to kv_seq - 1), and q_seq <= kv_seq.

    Kernel contract: `predicate` is block-granular (always True); kernels must
    use block sizes with block_q | layout block_q and block_kv | layout
    block_k, so every kernel block lies in one layout block and is empty or
    full w.r.t. this mask (`kernel_block_error` reports violations).
    """

    layout: tuple[tuple[bool, ...], ...]
    block_q: int
    block_k: int

    def __post_init__(self):
        _check_int("BlockSparseMask.block_q", self.block_q, 1)
        _check_int("BlockSparseMask.block_k", self.block_k, 1)
        layout = tuple(tuple(bool(x) for x in row) for row in np.asarray(self.layout))
        if not layout or not layout[0]:
            raise ValueError("BlockSparseMask.layout must be a non-empty 2-D layout")
        object.__setattr__(self, "layout", layout)

    @classmethod
    def from_array(cls, layout: np.ndarray, block_q: int, block_k: int) -> BlockSparseMask:
        return cls(tuple(map(tuple, np.asarray(layout, bool).tolist())), block_q, block_k)

    @property
    def has_block_sparse(self) -> bool:
        return True

    def validate(self, q_seq: int, kv_seq: int) -> None:
        if q_seq > kv_seq:
            raise ValueError(f"mask: BlockSparseMask needs q_seq <= kv_seq, got {q_seq} > {kv_seq}")
        want = (math.ceil(kv_seq / self.block_q), math.ceil(kv_seq / self.block_k))
        got = (len(self.layout), len(self.layout[0]))
        if got != want:
            raise ValueError(
                f"mask: BlockSparseMask layout has shape {got}, but kv_seq={kv_seq} with "
                f"block_q={self.block_q}, block_k={self.block_k} needs {want}"
            )

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        return (q_pos - k_pos) == (q_pos - k_pos)  # All True, broadcast shape.

    def host_predicate(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        layout = np.asarray(self.layout, dtype=bool)
        rows = np.clip(q_pos // self.block_q, 0, layout.shape[0] - 1)
        cols = np.clip(k_pos // self.block_k, 0, layout.shape[1] - 1)
        return layout[rows, cols]

    def kernel_block_error(self, block_q: int, block_kv: int) -> str | None:
        if self.block_q % block_q or self.block_k % block_kv:
            return (
                f"BlockSparseMask blocks ({self.block_q}, {self.block_k}) must be multiples "
                f"of the kernel blocks ({block_q}, {block_kv})"
            )
        return None


@dataclasses.dataclass(frozen=True)
class _Combination(Mask):
    """Members combined elementwise by `_combine` (| or &)."""

    masks: tuple[Mask, ...]
    _combine: ClassVar[Callable[[Any, Any], Any]]

    def predicate(self, q_pos: Array, k_pos: Array) -> Array:
        return functools.reduce(self._combine, (m.predicate(q_pos, k_pos) for m in self.masks))

    def host_predicate(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        shape = np.broadcast_shapes(q_pos.shape, k_pos.shape)
        members = (np.broadcast_to(m.host_predicate(q_pos, k_pos), shape) for m in self.masks)
        return functools.reduce(self._combine, members)

    def validate(self, q_seq: int, kv_seq: int) -> None:
        for m in self.masks:
            m.validate(q_seq, kv_seq)

    @property
    def has_block_sparse(self) -> bool:
        return any(m.has_block_sparse for m in self.masks)

    def kernel_block_error(self, block_q: int, block_kv: int) -> str | None:
        return _first_error(self.masks, block_q, block_kv)


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
    """Visible if any member mask says visible."""

    _combine = operator.or_

    def kernel_block_error(self, block_q: int, block_kv: int) -> str | None:
        # A block-sparse member's predicate is "True in visited blocks"; in a union
        # a visited block may come from another member, so mixing is not exact.
        sparse = [m.has_block_sparse for m in self.masks]
        if any(sparse) and not all(sparse):
            return "a union of a BlockSparseMask with a non-block-sparse mask has no elementwise predicate"
        return super().kernel_block_error(block_q, block_kv)


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
    """Visible if every member mask says visible."""

    _combine = operator.and_


def _first_error(masks: tuple[Mask, ...], block_q: int, block_kv: int) -> str | None:
    for m in masks:
        if (err := m.kernel_block_error(block_q, block_kv)) is not None:
            return err
    return None


def _flatten(kind: type, masks: tuple[Mask, ...]) -> tuple[Mask, ...]:
    out = []
    for m in masks:
        if not isinstance(m, Mask):
            raise ValueError(f"mask: expected a Mask, got {type(m).__name__}")  # noqa: TRY004
        out.extend(m.masks if isinstance(m, kind) else (m,))
    return tuple(out)


def combine(masks: list[Mask | None]) -> Mask | None:
    """Intersection of the given masks (None entries ignored); None if empty."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return Intersection(_flatten(Intersection, tuple(present)))
