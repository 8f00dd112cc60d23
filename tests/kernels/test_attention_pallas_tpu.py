"""Pallas Mosaic TPU attention: shared specs, refusals, block skipping, splash parity,
and lowering to Mosaic for a (simulated) TPU.

On CPU the backend runs its kernels in TPU interpret mode by itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test_base import AttentionTestBase
from jax.experimental.pallas.ops.tpu import splash_attention as splash

import kernels
from kernels.attention import masks
from kernels.attention.block_sizes import BlockSizes
from kernels.attention.reference import attention_reference
from kernels.attention.specs import AttentionSpec

# 64 x 64 forward blocks (32 on one axis of each backward pass, so passes pad
# differently): the CPU specs (seq <= 256) get EMPTY, PARTIAL and FULL blocks
# and sequence padding; block-sparse layouts (64) stay aligned. 32 x 32
# everywhere passes too but takes ~1.5x as long in interpret mode.
BLOCKS = BlockSizes(64, 64, 32, 64, 64, 32)


class TestPallasTpu(AttentionTestBase):
    IMPLEMENTATION = "pallas_tpu"
    BLOCK_SIZES = BLOCKS


def _inputs(q_seq=64, kv_seq=64, heads=2, kv_heads=2, head_dim=64, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    shapes = [(1, q_seq, heads, head_dim), *[(1, kv_seq, kv_heads, head_dim)] * 2]
    return [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]


def _tpu_attention(q, k, v, **kwargs):
    return kernels.attention(q, k, v, implementation="pallas_tpu", **kwargs)


@pytest.mark.parametrize(
    "backend, inputs, kwargs, message",
    [
        ("cpu", {"dtype": jnp.float16}, {}, "bfloat16 and float32"),
        ("cpu", {"head_dim": 96}, {}, "head_dim a multiple of 128"),
        ("cpu", {}, {"block_sizes": BlockSizes.uniform(32, 20)}, "block_kv a multiple of 8"),
        (
            "cpu",
            {},
            {
                "mask": masks.BlockSparseMask.from_array(np.eye(2, dtype=bool), 32, 32),
                "block_sizes": BlockSizes.uniform(64, 64),
            },
            "must be multiples of the kernel blocks",
        ),
        ("cpu", {}, {"mask": masks.CausalMask() | masks.BlockSparseMask(((1,),), 64, 64)}, "union"),
        ("tpu", {}, {}, "head_dim a multiple of 128"),
        ("tpu", {"head_dim": 128}, {"block_sizes": BLOCKS}, "block_q a multiple of 128"),
        ("gpu", {}, {}, "pallas_gpu"),
    ],
)
def test_unsupported_raises(monkeypatch, backend, inputs, kwargs, message):
    """Refusals name the rule; "tpu"/"gpu" rules are checked by faking the backend."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    with pytest.raises(kernels.UnsupportedError, match=message):
        _tpu_attention(*_inputs(**inputs), **kwargs)


def test_empty_blocks_are_never_read():
    """NaN in q rows / k, v columns that only EMPTY blocks touch cannot leak."""
    seq, block = 256, 64
    layout = np.tril(np.ones((4, 4), bool))
    layout[:, 2] = False  # kv block 2 is seen by no query.
    layout[1] = False  # q block 1 sees nothing.
    mask = masks.BlockSparseMask.from_array(layout, block, block)
    q, k, v = _inputs(seq, seq, heads=2, kv_heads=1)
    hidden_q = np.zeros((1, seq, 1, 1), bool)
    hidden_q[:, block : 2 * block] = True
    hidden_kv = np.zeros((1, seq, 1, 1), bool)
    hidden_kv[:, 2 * block : 3 * block] = True
    nan_q, nan_k, nan_v = (
        jnp.where(hidden, jnp.nan, x)
        for hidden, x in ((hidden_q, q), (hidden_kv, k), (hidden_kv, v))
    )
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

    def grads(fn, *args):
        def loss(*args):
            out = fn(*args)
            return jnp.sum(out * cotangent), out

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(*args)

    blocks = BlockSizes.uniform(block, 32)
    (_, out), (dq, dk, dv) = grads(
        lambda q, k, v: _tpu_attention(q, k, v, mask=mask, block_sizes=blocks), nan_q, nan_k, nan_v
    )
    zero = [jnp.where(h, 0.0, x) for h, x in ((hidden_q, q), (hidden_kv, k), (hidden_kv, v))]
    (_, ref_out), ref_grads = grads(
        lambda q, k, v: attention_reference(q, k, v, mask=mask.dense(seq, seq)), *zero
    )
    for name, x, ref in zip(["out", "dq", "dk", "dv"], [out, dq, dk, dv], [ref_out, *ref_grads]):
        assert np.isfinite(np.asarray(x)).all(), name
        np.testing.assert_allclose(x, ref, atol=1e-4, rtol=1e-4, err_msg=name)


def test_matches_splash_attention():
    """Causal MHA, head_dim 128, 128 x 128 blocks vs JAX's splash attention (interpreted)."""
    seq, heads = 256, 2
    q, k, v = _inputs(seq, seq, heads, heads, head_dim=128)
    splash_kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads),
        block_sizes=splash.BlockSizes(
            block_q=128,
            block_kv=128,
            block_q_dkv=128,
            block_kv_dkv=128,
            block_q_dq=128,
            block_kv_dq=128,
        ),
        interpret=True,
    )

    def ours(q, k, v):
        blocks = BlockSizes.uniform(128, 128)
        return _tpu_attention(q, k, v, causal=True, softmax_scale=1.0, block_sizes=blocks)

    def theirs(q, k, v):  # Splash: unbatched [heads, seq, head_dim], no scaling.
        q, k, v = (x[0].transpose(1, 0, 2) for x in (q, k, v))
        return splash_kernel(q, k, v).transpose(1, 0, 2)[None]

    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    results = [
        jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), (0, 1, 2)))(q, k, v)
        for f in (ours, theirs)
    ]
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(x, y, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "spec",
    [
        AttentionSpec("causal_gqa", 1, 1024, 1024, 4, 2, 128, "bfloat16", causal=True),
        AttentionSpec(
            "window_segments_odd_len",
            1,
            1000,
            1000,
            2,
            2,
            128,
            "bfloat16",
            sliding_window=200,
            with_segments=True,
        ),
        AttentionSpec("strided_f32", 1, 512, 512, 2, 1, 128, mask=masks.StridedMask(3, 16)),
        AttentionSpec("decode_hd256", 2, 1, 1024, 8, 1, 256, "bfloat16", causal=True),
        AttentionSpec(  # Default 512 blocks shrink to the 256 layout blocks.
            "block_sparse_256",
            1,
            2048,
            2048,
            2,
            2,
            128,
            "bfloat16",
            mask=masks.BlockSparseMask.from_array(np.tril(np.ones((8, 8), bool)), 256, 256),
        ),
    ],
    ids=lambda s: s.name,
)
def test_lowers_for_tpu(monkeypatch, spec):
    """Forward, dq and dk/dv lower to Mosaic with TPU rules and default block sizes
    (block shapes, scalar prefetch, ops); Mosaic's own compile needs a real TPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    q, k, v, segment_ids = spec.inputs()

    def loss(q, k, v):
        out = _tpu_attention(q, k, v, segment_ids=segment_ids, **spec.kwargs())
        return jnp.sum(out.astype(jnp.float32))

    device = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    ):
        lowered = (
            jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("tpu",))
        )
    assert lowered.as_text().count("tpu_custom_call") == 3  # fwd, dq, dk/dv.
