"""Pieces shared by the Pallas Triton attention kernels (forward and backward).

Inputs reach the kernels padded: sequences to a multiple of every block size
of the pass that reads them, head_dim to a power of two >= 16. Scores are kept
in base 2: s2 = scale * log2(e) * q.k, and lse2 = log2 sum exp2(s2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

from kernels.attention import masks as masks_lib
from kernels.attention.block_sizes import BlockSizes
from kernels.attention.mask_info import FULL, PARTIAL, mask_info

NEG = -1e30  # Finite score of masked pairs (masked rows never produce inf - inf).
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one attention call."""

    mask: masks_lib.Mask | None
    q_seq: int  # True (unpadded) lengths.
    kv_seq: int
    scale: float  # Softmax scale in the natural-log domain.
    block_sizes: BlockSizes
    interpret: bool

    @property
    def scale2(self) -> float:
        """Multiplier from q.k to base-2 scores."""
        return self.scale * LOG2E

    def compiler_params(self, head_dim: int) -> plgpu.CompilerParams:
        """Triton launch parameters (naming them also selects the Triton lowering)."""
        return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


class Visits(NamedTuple):
    """Per-program block visit lists built from MaskInfo (device arrays).

    indices: int32[num_programs, width]: visited blocks, PARTIAL ones first,
      then FULL ones (order does not matter to the online softmax).
    counts: int32[num_programs, 2]: (number of PARTIAL visits, total visits).
    """

    indices: jax.Array
    counts: jax.Array


def visits(indices: np.ndarray, kinds: np.ndarray, counts: np.ndarray, num_programs: int) -> Visits:
    """Reorders MaskInfo visit lists (partial first); rows past MaskInfo visit nothing."""
    key = np.where(kinds == PARTIAL, 0, np.where(kinds == FULL, 1, 2))
    order = np.argsort(key, axis=1, kind="stable")
    out_indices = np.zeros((num_programs, indices.shape[1]), np.int32)
    out_counts = np.zeros((num_programs, 2), np.int32)
    n = indices.shape[0]
    out_indices[:n] = np.take_along_axis(indices, order, axis=1)
    out_counts[:n, 0] = (kinds == PARTIAL).sum(axis=1)
    out_counts[:n, 1] = counts
    return Visits(jnp.asarray(out_indices), jnp.asarray(out_counts))


def forward_visits(cfg: Config, block_q: int, block_kv: int, num_programs: int) -> Visits:
    """For each q block, the kv blocks to visit."""
    info = mask_info(cfg.mask, cfg.q_seq, cfg.kv_seq, block_q, block_kv)
    return visits(info.kv_block_indices, info.kv_block_kinds, info.num_kv_visits, num_programs)


def transposed_visits(cfg: Config, block_q: int, block_kv: int, num_programs: int) -> Visits:
    """For each kv block, the q blocks to visit."""
    info = mask_info(cfg.mask, cfg.q_seq, cfg.kv_seq, block_q, block_kv)
    return visits(info.q_block_indices, info.q_block_kinds, info.num_q_visits, num_programs)


def visible(
    cfg: Config,
    q_start: jax.Array,
    kv_start: jax.Array,
    block_q: int,
    block_kv: int,
    q_segments: jax.Array | None,  # int32[block_q]
    kv_segments: jax.Array | None,  # int32[block_kv]
    partial: bool,
) -> jax.Array | None:
    """bool[block_q, block_kv] visibility of a block, or None if all visible.

    PARTIAL blocks apply the sequence bounds and the mask predicate; segment
    ids apply in every block.
    """
    out = None
    if partial:
        rows = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        cols = kv_start + jnp.arange(block_kv, dtype=jnp.int32)[None, :]
        out = (rows < cfg.q_seq) & (cols < cfg.kv_seq)
        if cfg.mask is not None:
            out = out & cfg.mask.predicate(rows + (cfg.kv_seq - cfg.q_seq), cols)
    if q_segments is not None:
        same = q_segments[:, None] == kv_segments[None, :]
        out = same if out is None else out & same
    return out


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b[n, k]^T -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [k, m]^T @ b[k, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b[k, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
