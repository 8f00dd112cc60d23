"""Context parallelism: ring and all-gather attention over the `sequence` mesh axis equal plain
attention (values and gradients), alone and inside a training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from llm.model import config as model_config
from llm.parallel import context as context_parallel
from llm.parallel import partitioning

RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
)
B, L, H, KVH, D = 2, 32, 4, 2, 8
# The ring at its longest (8 hops), and beside tensor parallelism (GQA heads split too).
MESHES = [{"sequence": 8}, {"sequence": 4, "tensor": 2}]


def inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, L, H, D))
    k, v = (jax.random.normal(kk, (B, L, KVH, D)) for kk in keys[1:3])
    cotangent = jax.random.normal(keys[3], (B, L, H, D))
    # Packed rows: documents of several lengths, boundaries inside and across device blocks.
    segment_ids = jnp.array([[0] * 3 + [1] * 14 + [2] * 15, [0] * 20 + [1] * 12], jnp.int32)
    return q, k, v, segment_ids, cotangent


def values_and_grads(fn, q, k, v, segment_ids, cotangent):
    def loss(q, k, v):
        out = fn(q, k, v, segment_ids)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("mode", model_config.CONTEXT_PARALLEL)
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_attention_equals_plain_attention(mode, sizes):
    q, k, v, segment_ids, cotangent = inputs()

    def plain(q, k, v, ids):
        return kernels.attention(q, k, v, causal=True, segment_ids=ids)

    want = values_and_grads(plain, q, k, v, segment_ids, cotangent)
    mesh = partitioning.make_mesh(sizes)
    with jax.set_mesh(mesh), partitioning.axis_rules(RULES):
        assert context_parallel.sequence_axis() == ("sequence", sizes["sequence"])

        def parallel(q, k, v, ids):
            return context_parallel.attention(q, k, v, ids, mode=mode)

        got = values_and_grads(parallel, q, k, v, segment_ids, cotangent)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_merge_of_two_key_halves_equals_attention_over_all_keys():
    q, k, v, segment_ids, _ = inputs()
    halves = [
        kernels.attention(
            q, k[:, s], v[:, s], segment_ids=(segment_ids, segment_ids[:, s]), return_lse=True
        )
        for s in (slice(0, L // 2), slice(L // 2, L))
    ]
    out, lse = context_parallel.merge(*halves[0], *halves[1])
    want, want_lse = kernels.attention(q, k, v, segment_ids=segment_ids, return_lse=True)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
