"""`kernels.attention` argument validation and implementation dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.attention import api
from kernels.attention.reference import attention_reference

B, S, H, KVH, D = 2, 16, 4, 2, 8


def _qkv(q_shape=(B, S, H, D), kv_shape=(B, S, KVH, D), dtype=jnp.float32):
    return jnp.ones(q_shape, dtype), jnp.ones(kv_shape, dtype), jnp.ones(kv_shape, dtype)


@pytest.mark.parametrize(
    "args,kwargs,names",
    [
        (_qkv(q_shape=(B, S, H)), {}, "q"),
        (_qkv(kv_shape=(B, S, KVH)), {}, "k"),
        ((*_qkv()[:2], jnp.ones((B, S + 1, KVH, D))), {}, "k and v"),
        (_qkv(kv_shape=(B + 1, S, KVH, D)), {}, "batch"),
        (_qkv(kv_shape=(B, S, KVH, D * 2)), {}, "head_dim"),
        (_qkv(kv_shape=(B, S, 3, D)), {}, "kv_heads"),
        (_qkv(), {"segment_ids": jnp.zeros((B, S + 1), jnp.int32)}, "segment_ids"),
        (_qkv(), {"segment_ids": jnp.zeros((B, S), jnp.float32)}, "segment_ids"),
        (
            _qkv(kv_shape=(B, S * 2, KVH, D)),
            {"segment_ids": jnp.zeros((B, S), jnp.int32)},
            "segment_ids",
        ),
        (_qkv(), {"sliding_window": 0}, "sliding_window"),
        (_qkv(), {"mask": np.ones((S, S), bool)}, "mask"),
        (_qkv(), {"mask": kernels.BlockSparseMask(((True,),), 4, 4)}, "mask"),
        (_qkv(), {"implementation": "flash"}, "implementation"),
        (_qkv(), {"block_sizes": (64, 64)}, "block_sizes"),
        ((jnp.ones((B, S, H, D), jnp.int32),) + _qkv()[1:], {}, "q"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(args, kwargs, names):
    with pytest.raises(ValueError, match=names):
        kernels.attention(*args, **kwargs)


def test_cudnn_on_cpu_raises_clear_error():
    with pytest.raises(kernels.UnsupportedError, match="cudnn.*GPU"):
        kernels.attention(*_qkv(dtype=jnp.bfloat16), implementation="cudnn")


def test_backend_import_error_propagates(monkeypatch):
    monkeypatch.setitem(api._MODULES, "pallas_gpu", "_no_such_dependency_test")
    with pytest.raises(ImportError):
        kernels.attention(*_qkv(), implementation="pallas_gpu")


def test_none_on_cpu_picks_xla_blockwise(monkeypatch):
    calls = []
    real = api._module
    monkeypatch.setattr(api, "_module", lambda name: calls.append(name) or real(name))
    out = kernels.attention(*_qkv(), causal=True)
    assert calls == ["xla_blockwise"] and out.shape == (B, S, H, D)


def test_none_on_cpu_falls_back_to_xla_for_q_offset(monkeypatch):
    """xla_blockwise lacks q_offset (its block lists are static), so None picks xla."""
    calls = []
    real = api._module
    monkeypatch.setattr(api, "_module", lambda name: calls.append(name) or real(name))
    kernels.attention(*_qkv(), causal=True, q_offset=0)
    assert calls == ["xla_blockwise", "xla"]


def test_causal_and_window_arguments_match_mask_objects():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (
        jax.random.normal(kk, s)
        for kk, s in zip(keys, [(B, S, H, D), (B, S, KVH, D), (B, S, KVH, D)])
    )
    a = kernels.attention(q, k, v, causal=True, sliding_window=5, mask=kernels.StridedMask(2))
    mask = kernels.CausalMask() & kernels.SlidingWindowMask(5) & kernels.StridedMask(2)
    b = attention_reference(q, k, v, mask=mask.dense(S, S))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_works_under_jit_and_returns_q_dtype():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: kernels.attention(q, k, v, sliding_window=4))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape


def _random_qkv():
    keys = jax.random.split(jax.random.key(1), 3)
    shapes = [(B, S, H, D), (B, S, KVH, D), (B, S, KVH, D)]
    return [jax.random.normal(kk, s) for kk, s in zip(keys, shapes)]


def test_return_lse_is_the_log_sum_exp_of_visible_scores():
    q, k, v = _random_qkv()
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True, implementation="xla")
    np.testing.assert_allclose(out, kernels.attention(q, k, v, causal=True), atol=1e-6)
    kh = jnp.repeat(k, H // KVH, axis=2)  # [B, S, H, D]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, kh) / np.sqrt(D)
    scores = jnp.where(np.tril(np.ones((S, S), bool)), scores, -jnp.inf)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(scores, axis=-1), rtol=1e-5)


def test_query_block_with_offset_and_segment_pair_equals_rows_of_full_attention():
    """A block of queries at a (traced) offset, with its own segment ids, sees what the same rows
    of the full attention see: the masks context parallelism builds between blocks."""
    q, k, v = _random_qkv()
    segment_ids = jnp.array([[0] * 5 + [1] * 11, [0] * 12 + [1] * 4], jnp.int32)
    full = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids)

    @jax.jit
    def rows(start):
        qb = jax.lax.dynamic_slice_in_dim(q, start, 4, axis=1)
        sb = jax.lax.dynamic_slice_in_dim(segment_ids, start, 4, axis=1)
        return kernels.attention(
            qb, k, v, causal=True, segment_ids=(sb, segment_ids), q_offset=start
        )

    for start in (0, 4, 12):
        np.testing.assert_allclose(rows(start), full[:, start : start + 4], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        ({"return_lse": True}, "return_lse"),
        ({"q_offset": 2}, "q_offset"),
        ({"segment_ids": (jnp.zeros((B, S), jnp.int32),) * 2}, "kv_segment_ids"),
    ],
)
@pytest.mark.parametrize("name", ["cudnn", "pallas_gpu", "pallas_tpu"])
def test_block_features_on_other_backends_raise_unsupported(name, kwargs, feature):
    with pytest.raises(kernels.UnsupportedError, match=f"{name}.*{feature}"):
        kernels.attention(*_qkv(), causal=True, implementation=name, **kwargs)


def test_q_offset_cannot_shift_a_block_sparse_mask():
    mask = kernels.BlockSparseMask(((True,),), S, S)
    with pytest.raises(ValueError, match="q_offset"):
        kernels.attention(*_qkv(), mask=mask, q_offset=0)
