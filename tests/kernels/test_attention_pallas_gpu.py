"""Pallas Triton flash attention: interpret mode on CPU, Triton lowering checks.

Block sizes 32/16 (forward, dq) and 16/32 (dk/dv) make every CPU spec mix
EMPTY, PARTIAL and FULL blocks and differ between the three passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test_base import AttentionTestBase
from jax.experimental.pallas.ops.gpu import attention as jax_attention

import kernels
from kernels.attention import masks, pallas_gpu
from kernels.attention.block_sizes import BlockSizes
from kernels.attention.mask_info import EMPTY, FULL, PARTIAL, mask_info
from kernels.attention.reference import attention_reference
from kernels.attention.specs import BENCHMARK_SPECS, CPU_SPECS, AttentionSpec

BLOCK_SIZES = BlockSizes(32, 16, 16, 32, 32, 16)


class TestPallasGpu(AttentionTestBase):
    IMPLEMENTATION = "pallas_gpu"
    BLOCK_SIZES = BLOCK_SIZES


def _grads(fn, q, k, v, cotangent):
    """(out, (dq, dk, dv)) of fn under the cotangent."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent.astype(out.dtype))


def test_block_kinds_all_occur():
    kinds = set()
    for spec in CPU_SPECS:
        info = mask_info(spec.full_mask(), spec.q_seq, spec.kv_seq, 32, 16)
        kinds |= set(np.unique(info.block_kind).tolist())
    assert kinds == {EMPTY, PARTIAL, FULL}


def test_empty_blocks_are_never_read():
    """NaN k/v in kv blocks no query may see must not reach out or gradients."""
    layout = np.ones((4, 4), bool)
    layout[:, 2] = False  # Keys 64..95 are invisible to every query.
    layout[1, 3] = False
    mask = masks.BlockSparseMask.from_array(layout, 32, 32)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 128, 4, 64), np.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA group 2.
    cotangent = jnp.asarray(rng.standard_normal(q.shape, np.float32))
    poisoned_k, poisoned_v = k.copy(), v.copy()
    poisoned_k[:, 64:96], poisoned_v[:, 64:96] = np.nan, np.nan

    def ours(q, k, v):
        return kernels.attention(
            q, k, v, mask=mask, implementation="pallas_gpu", block_sizes=BLOCK_SIZES
        )

    out, grads = _grads(ours, *map(jnp.asarray, (q, poisoned_k, poisoned_v)), cotangent)
    dense = mask.dense(128, 128)
    ref_out, ref_grads = _grads(
        lambda q, k, v: attention_reference(q, k, v, mask=dense),
        *map(jnp.asarray, (q, k, v)),
        cotangent,
    )
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-4)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref_g, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_matches_jax_triton_mha():
    """Same outputs and gradients as JAX's own Pallas Triton kernel (causal + segments)."""
    spec = AttentionSpec("shared", 1, 128, 128, 2, 2, 64, causal=True, with_segments=True)
    q, k, v, segment_ids = spec.inputs()
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

    def ours(q, k, v):
        return pallas_gpu.flash_attention(
            q,
            k,
            v,
            mask=masks.CausalMask(),
            segment_ids=segment_ids,
            softmax_scale=0.125,
            block_sizes=BlockSizes.uniform(32, 32),
            interpret=True,
        )

    def theirs(q, k, v):
        blocks = jax_attention.BlockSizes(32, 32, 32, 32, 32, 32)
        return jax_attention.mha(
            q, k, v, segment_ids, sm_scale=0.125, causal=True, block_sizes=blocks, interpret=True
        )

    for a, b in zip(_grads(ours, q, k, v, cotangent), _grads(theirs, q, k, v, cotangent)):
        np.testing.assert_allclose(jax.tree.leaves(a), jax.tree.leaves(b), atol=1e-4, rtol=1e-4)


def test_head_dim_padding():
    """head_dim 40 runs padded to 64 (zero columns change no score)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 40), np.float32)) for _ in range(3))
    cotangent = jnp.asarray(rng.standard_normal(q.shape, np.float32))

    def ours(q, k, v):
        return kernels.attention(
            q, k, v, causal=True, implementation="pallas_gpu", block_sizes=BLOCK_SIZES
        )

    dense = masks.CausalMask().dense(64, 64)
    for a, b in zip(
        _grads(ours, q, k, v, cotangent),
        _grads(lambda q, k, v: attention_reference(q, k, v, mask=dense), q, k, v, cotangent),
    ):
        np.testing.assert_allclose(jax.tree.leaves(a), jax.tree.leaves(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 512}, "head_dim <= 256"),
        ({"block_sizes": BlockSizes.uniform(24, 32)}, "powers of two >= 16"),
        ({"block_sizes": BlockSizes.uniform(8, 16)}, "powers of two >= 16"),
        (
            {"mask": masks.BlockSparseMask.from_array(np.eye(4, dtype=bool), 16, 16)},
            "must be multiples of the kernel blocks",
        ),
    ],
)
def test_unsupported(kwargs, match):
    head_dim = kwargs.get("head_dim", 64)
    q = jnp.zeros((1, 64, 2, head_dim), jnp.float32)
    with pytest.raises(kernels.UnsupportedError, match=match):
        kernels.attention(
            q,
            q,
            q,
            mask=kwargs.get("mask"),
            implementation="pallas_gpu",
            block_sizes=kwargs.get("block_sizes", BlockSizes.uniform(32, 32)),
        )


@pytest.mark.parametrize(
    ("spec", "block_sizes"),
    [(s, BLOCK_SIZES) for s in CPU_SPECS] + [(s, None) for s in BENCHMARK_SPECS if s.q_seq <= 8192],
    ids=lambda x: getattr(x, "name", "default" if x is None else "small"),
)
def test_lowers_to_triton(spec: AttentionSpec, block_sizes: BlockSizes | None):
    """Forward and backward lower to Triton IR for a CUDA target (no GPU needed).

    Benchmark specs (up to 8k; longer ones only take longer) use the default
    GPU block sizes and abstract inputs.
    """
    dtype = jnp.dtype(spec.dtype)
    q = jax.ShapeDtypeStruct((spec.batch, spec.q_seq, spec.heads, spec.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((spec.batch, spec.kv_seq, spec.kv_heads, spec.head_dim), dtype)
    segments = jnp.zeros((spec.batch, spec.q_seq), jnp.int32) if spec.with_segments else None

    def loss(q, k, v):
        out = pallas_gpu.flash_attention(
            q,
            k,
            v,
            mask=spec.full_mask(),
            segment_ids=segments,
            softmax_scale=0.125,
            block_sizes=block_sizes,
            interpret=False,
        )
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3  # Forward, dq, dk/dv.
