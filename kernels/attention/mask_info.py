"""Host-side block classification of a mask, consumed by the kernels.

For a (mask, q_seq, kv_seq, block_q, block_kv) the q rows and kv columns are
cut into blocks of block_q x block_kv (the last block of each axis may run
past the sequence end). Each (q block, kv block) pair is

  EMPTY   (0): no visible pair -> the kernel skips the block entirely;
  PARTIAL (1): some pairs visible, or the block runs past a sequence end ->
               the kernel applies `mask.predicate` (and a bounds check
               q_row < q_seq, k_col < kv_seq) elementwise;
  FULL    (2): every pair visible and inside both sequences -> no masking.

Segment ids are not part of MaskInfo: kernels apply them elementwise.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from kernels.attention import masks as masks_lib

EMPTY, PARTIAL, FULL = 0, 1, 2


class MaskInfo(NamedTuple):
    """Block structure of a mask. All arrays are numpy; visit lists are compacted.

    Attributes:
      block_kind: int8[num_q_blocks, num_kv_blocks], EMPTY / PARTIAL / FULL.
      kv_block_indices: int32[num_q_blocks, max_kv_visits]: for each q block,
        the non-empty kv blocks in increasing order; entries past
        num_kv_visits[i] repeat the last valid index (0 if none), so a
        pipelined kernel re-fetches the same block instead of a new one.
      kv_block_kinds: int8[num_q_blocks, max_kv_visits]: block_kind of each
        visited kv block (EMPTY in the padding).
      num_kv_visits: int32[num_q_blocks]: number of valid entries per row;
        0 means the whole q block sees nothing (output zeros).
      q_block_indices, q_block_kinds: int32/int8[num_kv_blocks, max_q_visits]:
        the transpose, for the dk/dv backward pass (for each kv block, the q
        blocks to visit), padded the same way.
      num_q_visits: int32[num_kv_blocks].
      q_seq, kv_seq, block_q, block_kv: the key this was computed for.
      q_offset: kv_seq - q_seq; kernel q positions are row + q_offset.
    """

    block_kind: np.ndarray
    kv_block_indices: np.ndarray
    kv_block_kinds: np.ndarray
    num_kv_visits: np.ndarray
    q_block_indices: np.ndarray
    q_block_kinds: np.ndarray
    num_q_visits: np.ndarray
    q_seq: int
    kv_seq: int
    block_q: int
    block_kv: int
    q_offset: int

    @property
    def num_q_blocks(self) -> int:
        return self.block_kind.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.block_kind.shape[1]


def _block_kinds(
    mask: masks_lib.Mask | None, q_seq: int, kv_seq: int, block_q: int, block_kv: int
) -> np.ndarray:
    """int8[num_q_blocks, num_kv_blocks], evaluated one q-block row at a time."""
    nq, nk = math.ceil(q_seq / block_q), math.ceil(kv_seq / block_kv)
    kinds = np.empty((nq, nk), np.int8)
    k_pos = np.arange(nk * block_kv, dtype=np.int32)[None, :]
    k_in = k_pos < kv_seq
    for i in range(nq):
        rows = np.arange(i * block_q, (i + 1) * block_q, dtype=np.int32)[:, None]
        visible = (rows < q_seq) & k_in
        if mask is not None:
            visible = visible & mask.host_predicate(rows + np.int32(kv_seq - q_seq), k_pos)
        # visible is False outside the sequences, so a block running past an end
        # is never FULL.
        visible = visible.reshape(block_q, nk, block_kv).transpose(1, 0, 2).reshape(nk, -1)
        kinds[i] = np.where(
            visible.all(axis=1), FULL, np.where(visible.any(axis=1), PARTIAL, EMPTY)
        )
    return kinds


def _compact(kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of `kinds`: (indices, kinds, counts) of non-empty columns, padded."""
    counts = (kinds != EMPTY).sum(axis=1).astype(np.int32)
    width = max(int(counts.max(initial=0)), 1)
    indices = np.zeros((kinds.shape[0], width), np.int32)
    visit_kinds = np.zeros((kinds.shape[0], width), np.int8)
    for i, row in enumerate(kinds):
        cols = np.flatnonzero(row != EMPTY).astype(np.int32)
        if cols.size:
            indices[i, : cols.size] = cols
            indices[i, cols.size :] = cols[-1]
            visit_kinds[i, : cols.size] = row[cols]
    return indices, visit_kinds, counts


@functools.lru_cache(maxsize=256)
def mask_info(
    mask: masks_lib.Mask | None, q_seq: int, kv_seq: int, block_q: int, block_kv: int
) -> MaskInfo:
    """Cached block classification of `mask` (None = no mask) for these shapes.

    Raises ValueError if the mask cannot apply to the lengths or the kernel
    blocks are not compatible with the mask's predicate.
    """
    if mask is not None:
        mask.validate(q_seq, kv_seq)
        if (err := mask.kernel_block_error(block_q, block_kv)) is not None:
            raise ValueError(f"mask: {err}")
    kinds = _block_kinds(mask, q_seq, kv_seq, block_q, block_kv)
    kv_idx, kv_kinds, kv_count = _compact(kinds)
    q_idx, q_kinds, q_count = _compact(kinds.T)
    for a in (kinds, kv_idx, kv_kinds, kv_count, q_idx, q_kinds, q_count):
        a.setflags(write=False)  # Cached: must not be mutated by callers.
    return MaskInfo(
        kinds,
        kv_idx,
        kv_kinds,
        kv_count,
        q_idx,
        q_kinds,
        q_count,
        q_seq,
        kv_seq,
        block_q,
        block_kv,
        kv_seq - q_seq,
    )
