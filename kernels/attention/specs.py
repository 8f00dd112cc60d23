"""Shared attention argument specs: tests (CPU_SPECS), accelerator benchmarks (BENCHMARK_SPECS)
and CPU benchmarks of the compiled XLA paths (CPU_BENCHMARK_SPECS)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import masks as m


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One `attention` call: shapes, dtype and masking arguments."""

    name: str
    batch: int
    q_seq: int
    kv_seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    sliding_window: int | None = None
    mask: m.Mask | None = None
    with_segments: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Masking keyword arguments of `attention` (segment_ids come from `inputs`)."""
        return {"causal": self.causal, "sliding_window": self.sliding_window, "mask": self.mask}

    def full_mask(self) -> m.Mask | None:
        """The single mask object `attention` builds from causal/sliding_window/mask."""
        return m.combine(
            [
                m.CausalMask() if self.causal else None,
                m.SlidingWindowMask(self.sliding_window) if self.sliding_window else None,
                self.mask,
            ]
        )

    def dense_mask(self) -> np.ndarray | None:
        """bool[q_seq, kv_seq] ground truth (without segments), or None."""
        full = self.full_mask()
        return None if full is None else full.dense(self.q_seq, self.kv_seq)

    def inputs(self, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """(q, k, v, segment_ids) with standard-normal values (host RNG: no compiles)."""
        rng = np.random.default_rng(seed)
        dtype = jnp.dtype(self.dtype)
        kv_shape = (self.batch, self.kv_seq, self.kv_heads, self.head_dim)
        q, k, v = (
            jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
            for shape in ((self.batch, self.q_seq, self.heads, self.head_dim), kv_shape, kv_shape)
        )
        segment_ids = None
        if self.with_segments:  # Packed sequences: ids increase at random boundaries.
            starts = rng.random((self.batch, self.q_seq)) < 4 / self.q_seq
            segment_ids = jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))
        return q, k, v, segment_ids


def _layout(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random block layout with the diagonal on and one empty row block."""
    rng = np.random.default_rng(seed)
    layout = rng.random((rows, cols)) < 0.4
    layout[np.arange(min(rows, cols)), np.arange(min(rows, cols))] = True
    layout[1] = False
    return layout


S = AttentionSpec
# Small and fast: every kernel backend runs all of these in interpret mode.
# Lengths deliberately include non-multiples of common block sizes (64/128).
CPU_SPECS: list[AttentionSpec] = [
    S("mha", 2, 128, 128, 2, 2, 64),
    S("mha_causal", 1, 128, 128, 2, 2, 64, causal=True),
    S("mha_causal_bf16", 1, 128, 128, 2, 2, 64, "bfloat16", causal=True),
    S("gqa2_causal_odd_len", 1, 100, 100, 4, 2, 64, causal=True),
    S("gqa4_causal_bf16", 1, 192, 192, 8, 2, 64, "bfloat16", causal=True),
    S("mqa8_causal", 1, 96, 96, 8, 1, 64, causal=True),
    S("hd128_causal", 1, 128, 128, 2, 1, 128, causal=True),
    S("hd128_bf16_gqa2", 1, 130, 130, 4, 2, 128, "bfloat16"),
    S("decode_q1", 2, 1, 200, 4, 2, 64, causal=True),
    S("chunked_prefill", 1, 48, 176, 4, 4, 64, causal=True),
    S("q_longer_than_kv_causal", 1, 96, 64, 2, 2, 64, causal=True),  # First 32 rows empty.
    S("cross_no_mask", 1, 40, 150, 2, 1, 64),
    S("sliding_window", 1, 256, 256, 2, 2, 64, sliding_window=48),
    S("sliding_window_bf16_gqa", 1, 200, 200, 4, 1, 64, "bfloat16", sliding_window=33),
    S("sliding_window_decode", 1, 16, 256, 2, 2, 64, sliding_window=40),
    S("sliding_window_two_sided", 1, 160, 160, 2, 2, 64, mask=m.SlidingWindowMask(20, 12)),
    S("local_global", 1, 192, 192, 2, 2, 64, mask=m.LocalGlobalMask(24, 5)),
    S("local_global_causal", 1, 150, 150, 4, 2, 64, causal=True, mask=m.LocalGlobalMask(16, 3)),
    S(
        "strided_causal",
        1,
        128,
        128,
        2,
        2,
        64,
        causal=True,
        mask=m.SlidingWindowMask(8) | m.StridedMask(8),
    ),
    S("strided_block", 1, 160, 160, 2, 1, 64, mask=m.StridedMask(3, block=16)),
    S("chunked_causal", 1, 160, 160, 2, 2, 64, causal=True, mask=m.ChunkedMask(48)),
    S(
        "block_sparse",
        1,
        256,
        256,
        2,
        2,
        64,
        mask=m.BlockSparseMask.from_array(_layout(4, 4, 0), 64, 64),
    ),
    S(
        "block_sparse_causal_bf16",
        1,
        192,
        192,
        4,
        2,
        64,
        "bfloat16",
        causal=True,
        mask=m.BlockSparseMask.from_array(_layout(3, 3, 1), 64, 64),
    ),
    S("segments", 2, 128, 128, 2, 2, 64, with_segments=True),
    S("segments_causal_gqa", 2, 112, 112, 4, 2, 64, causal=True, with_segments=True),
    S(
        "segments_window_bf16",
        1,
        160,
        160,
        2,
        2,
        64,
        "bfloat16",
        sliding_window=32,
        with_segments=True,
    ),
    S(
        "segments_block_sparse",
        1,
        128,
        128,
        2,
        1,
        64,
        with_segments=True,
        mask=m.BlockSparseMask.from_array(_layout(2, 2, 2), 64, 64),
    ),
]

BENCHMARK_SPECS: list[AttentionSpec] = [
    *(
        S(f"causal_{n // 1024}k", max(1, 16384 // n), n, n, 16, 16, 128, "bfloat16", causal=True)
        for n in (1024, 2048, 4096, 8192, 16384, 32768)
    ),
    S("causal_gqa8_8k", 2, 8192, 8192, 32, 4, 128, "bfloat16", causal=True),
    S("window1k_8k", 2, 8192, 8192, 16, 16, 128, "bfloat16", sliding_window=1024),
    S("window1k_32k", 1, 32768, 32768, 16, 16, 128, "bfloat16", sliding_window=1024),
    S(
        "block_sparse_8k",
        2,
        8192,
        8192,
        16,
        16,
        128,
        "bfloat16",
        mask=m.BlockSparseMask.from_array(_layout(32, 32, 3), 256, 256),
    ),
]

# The default model's attention (experiments/default.py: 4 heads, 2 kv heads, head_dim 64,
# float32) at 4096 tokens per call, causal and with a 128-token sliding window.
CPU_BENCHMARK_SPECS: list[AttentionSpec] = [
    *(S(f"cpu_causal_{n}", 4096 // n, n, n, 4, 2, 64, causal=True) for n in (256, 1024, 2048)),
    *(
        S(f"cpu_window128_{n}", 4096 // n, n, n, 4, 2, 64, sliding_window=128)
        for n in (256, 1024, 2048)
    ),
]
