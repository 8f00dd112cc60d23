"""Block-skipping XLA attention: the shared specs, the scores it skips, its edge cases.

Block sizes 32/16 make every CPU spec mix EMPTY, PARTIAL and FULL blocks and leave ragged last
blocks (odd lengths).
"""

from __future__ import annotations

import logging

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test_base import AttentionTestBase

import kernels
from kernels.attention import masks
from kernels.attention.block_sizes import BlockSizes
from kernels.attention.mask_info import mask_info
from kernels.attention.reference import attention_reference

BLOCK_SIZES = BlockSizes.uniform(32, 16)


class TestXlaBlockwise(AttentionTestBase):
    IMPLEMENTATION = "xla_blockwise"
    BLOCK_SIZES = BLOCK_SIZES


def _qkv(seq: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, seq, heads, head_dim), np.float32)
    k, v = (rng.standard_normal((1, seq, kv_heads, head_dim), np.float32) for _ in range(2))
    return q, k, v


def _blockwise(q, k, v, block: int = 64, **kwargs):
    return kernels.attention(
        q, k, v, implementation="xla_blockwise", block_sizes=BlockSizes.uniform(block, block),
        **kwargs,
    )  # fmt: skip


def _out_and_grads(fn, cotangent, *args):
    """(out, (dq, dk, dv)) of fn under the cotangent, jitted."""

    def run(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    return jax.jit(run)(*args)


def _score_flops(fn, *args) -> int:
    """FLOPs of the dot_generals in fn's jaxpr (2 per multiply-add): the matmuls it computes."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs_shape = eqn.invars[0].aval.shape
                contracted = int(np.prod([lhs_shape[d] for d in lhs_contract]))
                total += 2 * contracted * int(np.prod(eqn.outvars[0].aval.shape))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                total += count(sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize(
    ("kwargs", "visited_blocks"),
    [
        ({"causal": True}, 10),  # 4 x 4 blocks of 64: the lower triangle with its diagonal
        ({"sliding_window": 64}, 7),  # the diagonal and the block before it
        ({}, 16),
    ],
)
def test_computes_only_the_visited_blocks(kwargs, visited_blocks):
    """Forward and forward+backward matmul FLOPs are the visited fraction of the reference's."""
    q, k, v = map(jnp.asarray, _qkv(256))
    mask = masks.combine(
        [masks.CausalMask() if kwargs.get("causal") else None]
        + [
            masks.SlidingWindowMask(kwargs["sliding_window"])
            if "sliding_window" in kwargs
            else None
        ]
    )
    assert int(mask_info(mask, 256, 256, 64, 64).num_kv_visits.sum()) == visited_blocks

    def grads(attention):
        return jax.grad(lambda q, k, v: attention(q, k, v).sum(), argnums=(0, 1, 2))

    def ours(q, k, v):
        return _blockwise(q, k, v, **kwargs)

    def reference(q, k, v):
        return kernels.attention(q, k, v, implementation="xla", **kwargs)

    for transform in (lambda f: f, grads):
        assert _score_flops(transform(ours), q, k, v) * 16 == (
            _score_flops(transform(reference), q, k, v) * visited_blocks
        )


def test_return_lse_and_segment_pair_match_the_reference():
    """The context-parallel features it declares: lse and (q, kv) segment id pairs."""
    q, k, v = map(jnp.asarray, _qkv(100))
    ids = jnp.asarray(np.repeat(np.arange(4, dtype=np.int32), 25)[None])
    q_ids, kv_ids = ids[:, 60:], ids
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((1, 40, 4, 16), np.float32))

    def run(implementation):
        def loss(q, k, v):
            out, lse = kernels.attention(
                q[:, 60:], k, v, causal=True, segment_ids=(q_ids, kv_ids), return_lse=True,
                implementation=implementation, block_sizes=BLOCK_SIZES,
            )  # fmt: skip
            return jnp.sum(out * cotangent) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), lse

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (value, lse), grads = run("xla_blockwise")
    (ref_value, ref_lse), ref_grads = run("xla")
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref_g, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")


def test_matches_jax_dot_product_attention():
    """Same values and gradients as jax.nn.dot_product_attention (causal, window 40, GQA)."""
    q, k, v = map(jnp.asarray, _qkv(192, seed=2))

    def ours(q, k, v):
        return _blockwise(q, k, v, causal=True, sliding_window=40)

    def theirs(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(39, 0), implementation="xla"
        )

    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape, np.float32))
    out, grads = _out_and_grads(ours, cotangent, q, k, v)
    ref_out, ref_grads = _out_and_grads(theirs, cotangent, q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-4)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref_g, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_empty_blocks_are_never_read():
    """NaN keys/values in key blocks no query may see reach neither out nor the gradients."""
    q, k, v = _qkv(128)
    layout = np.ones((4, 4), bool)
    layout[:, 2] = False  # keys 64..95 are invisible to every query
    mask = masks.BlockSparseMask.from_array(layout, 32, 32)
    poisoned_k, poisoned_v = k.copy(), v.copy()
    poisoned_k[:, 64:96], poisoned_v[:, 64:96] = np.nan, np.nan
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

    out, grads = _out_and_grads(
        lambda q, k, v: _blockwise(q, k, v, block=32, mask=mask),
        cotangent,
        q,
        poisoned_k,
        poisoned_v,
    )
    dense = mask.dense(128, 128)
    ref_out, ref_grads = _out_and_grads(
        lambda q, k, v: attention_reference(q, k, v, mask=dense), cotangent, q, k, v
    )
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-4)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        g, ref_g = np.asarray(g), np.asarray(ref_g)
        if name != "q":  # the invisible keys get no gradient
            assert (g[:, 64:96] == 0).all(), name
            g, ref_g = np.delete(g, np.s_[64:96], axis=1), np.delete(ref_g, np.s_[64:96], axis=1)
        np.testing.assert_allclose(g, ref_g, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_block_larger_than_the_sequence_is_one_block_and_logged(caplog):
    q, k, v = map(jnp.asarray, _qkv(48))
    with caplog.at_level(logging.INFO, logger="kernels.attention.blockwise"):
        out = _blockwise(q, k, v, block=64, causal=True)
    assert "block_q=64 exceeds the sequence length 48; using one block of 48" in caplog.text
    assert "block_kv=64 exceeds" in caplog.text
    dense = masks.CausalMask().dense(48, 48)
    np.testing.assert_allclose(out, attention_reference(q, k, v, mask=dense), atol=1e-6)


def test_q_offset_is_unsupported():
    q, k, v = map(jnp.asarray, _qkv(32))
    with pytest.raises(kernels.UnsupportedError, match="xla_blockwise.*q_offset"):
        kernels.attention(q, k, v, causal=True, q_offset=0, implementation="xla_blockwise")


def test_block_sparse_mask_needs_aligned_blocks():
    mask = masks.BlockSparseMask.from_array(np.eye(4, dtype=bool), 16, 16)
    q, k, v = map(jnp.asarray, _qkv(64))
    with pytest.raises(kernels.UnsupportedError, match="multiples of the kernel blocks"):
        _blockwise(q, k, v, block=32, mask=mask)
