"""Kernel block sizes and per-backend defaults."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along q and kv for the forward and the two backward passes.

    block_q, block_kv: forward pass (one program per q block, loop over kv).
    block_q_dkv, block_kv_dkv: backward dk/dv pass (one program per kv block).
    block_q_dq, block_kv_dq: backward dq pass (one program per q block).
    """

    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int
    block_q_dq: int
    block_kv_dq: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"block_sizes.{f.name} must be a positive int, got {value!r}")

    @classmethod
    def uniform(cls, block_q: int, block_kv: int) -> BlockSizes:
        """Same (block_q, block_kv) for all passes."""
        return cls(block_q, block_kv, block_q, block_kv, block_q, block_kv)


def default_block_sizes(backend: str, head_dim: int, dtype: np.dtype) -> BlockSizes:
    """Defaults per backend ("gpu", "tpu", other). Untuned placeholders:
    tuned figures will replace these after GPU/TPU benchmark runs."""
    itemsize = np.dtype(dtype).itemsize
    if backend == "gpu":
        # Triton: keep q/k/v tiles + accumulator within shared memory / registers.
        big = 64 if head_dim > 128 or itemsize > 2 else 128
        return BlockSizes(big, 64, 64, big, big, 64)
    if backend == "tpu":
        # Mosaic: multiples of 128 on the lane axis; large tiles amortize overhead.
        big = 256 if head_dim > 128 else 512
        return BlockSizes.uniform(big, big)
    return BlockSizes.uniform(64, 64)  # CPU / interpret mode.
