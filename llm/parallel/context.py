"""Context parallelism: causal self-attention over a sequence split on the `sequence` mesh axis.

`attention` is what the model calls. Without a mesh, or when the rules table maps the logical
"seq" axis to no mesh axis of size > 1, it is a plain `kernels.attention` call. Otherwise it runs
one of two schemes under `jax.shard_map` (n = devices on the sequence axis, L = sequence length):

* "all_gather": each device keeps its contiguous query block of L/n tokens, all-gathers the keys,
  values and segment ids, and attends its block to the whole sequence with causal offset
  r·L/n (device r). Simple, and one collective; memory holds the full K/V per device. Causal
  work is uneven across devices (the last block sees the most keys); the XLA reference attention
  computes masked scores anyway, so it only matters for block-skipping kernels.
* "ring": K/V blocks travel around the ring with `jax.lax.ppermute` (n - 1 hops); each device
  attends its queries to the visiting block and merges the partial outputs by their
  log-sum-exp, so the forward holds at most two K/V blocks per device. Causal load balancing by
  zig-zag: the sequence is cut into 2n chunks and device r holds chunks r and 2n-1-r. Then every
  step after the first costs the same half block on every device: a block from an earlier
  device is visible to all local queries through its first chunk only; a block from a later
  device is visible, whole, to the local second chunk only. The zig-zag permutation is done
  *inside this function*, by two `ppermute`s of the contiguous blocks on the way in and two on
  the way out (per layer), so the model, the batch and the loss see the natural token order.

Packed sequences are handled: segment ids travel with the K/V blocks. Gradients come from
autodiff through shard_map, ppermute/all_gather and the scan over ring steps: correct, not
tuned. Autodiff keeps every visiting K/V block for the backward, so in training the ring holds
all n blocks per layer like "all_gather" does (a custom VJP that re-runs the ring backwards
would not), and the hops do not overlap the compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import kernels
from kernels.attention.masks import CausalMask, Mask
from llm.errors import check
from llm.model.config import CONTEXT_PARALLEL as MODES
from llm.model.config import ModelConfig
from llm.parallel import partitioning


def validate(cfg: ModelConfig, seq_len: int, mesh: jax.sharding.Mesh, rules) -> None:
    """Context parallelism can run `cfg` on `mesh`: dense attention only, and for "ring" a
    sequence that splits into two chunks per device (zig-zag). ConfigError otherwise."""
    seq_axes = [a for a in partitioning.mesh_axes_of("seq", rules) if mesh.shape[a] > 1]
    if not seq_axes:
        return
    axis, n = seq_axes[0], mesh.shape[seq_axes[0]]
    check(
        set(cfg.layer_patterns) == {"dense"},
        f"config.model.attention_pattern={cfg.attention_pattern!r}: context parallelism "
        f"(mesh.{axis}={n}) supports dense causal attention only; "
        "use --config.model.attention_pattern=dense or --config.mesh.sequence=1.",
    )
    if cfg.context_parallel == "ring":
        check(
            seq_len % (2 * n) == 0,
            f"config.seq_len={seq_len} does not split into {2 * n} chunks: ring context "
            f"parallelism over mesh.{axis}={n} gives each device two chunks "
            f"(zig-zag); use a multiple of {2 * n}, or --config.model.context_parallel=all_gather.",
        )


def sequence_axis() -> tuple[str | None, int]:
    """The mesh axis the ambient rules table puts the logical "seq" axis on, and its size
    (None, 1 when there is no mesh, no rules, or the sequence is not split)."""
    rules = partitioning.current_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return None, 1
    axes = [a for a in partitioning.mesh_axes_of("seq", rules) if mesh.shape[a] > 1]
    if len(axes) > 1:
        raise ValueError(f"axis_rules split 'seq' over several mesh axes {axes}; use one.")
    return (axes[0], mesh.shape[axes[0]]) if axes else (None, 1)


def attention(
    q: jax.Array,  # [B, L, H, Dh]
    k: jax.Array,  # [B, L, K, Dh]
    v: jax.Array,  # [B, L, K, Dh]
    segment_ids: jax.Array | None,  # int32 [B, L]
    *,
    mask: Mask | None = None,
    mode: str = "ring",
    implementation: str | None = None,
) -> jax.Array:
    """Causal attention (packed segments allowed) -> [B, L, H, Dh], split over the sequence axis.

    `mask` (a layer's llm.model.patterns pattern, causality included) replaces plain causal masking;
    split over the sequence axis only dense causal attention is supported.
    """
    axis, n = sequence_axis()
    if n == 1:
        return kernels.attention(
            q,
            k,
            v,
            causal=mask is None,
            mask=mask,
            segment_ids=segment_ids,
            implementation=implementation,
        )
    if mask is not None and mask != CausalMask():
        raise ValueError(
            f"context parallelism (sequence split over {n} devices) supports dense causal "
            f"attention only, got the mask {mask}; use attention_pattern='dense' or mesh.sequence=1"
        )
    if mode not in MODES:
        raise ValueError(f"context parallel mode must be one of {MODES}, got {mode!r}")
    rules = partitioning.current_rules()
    q_spec = partitioning.logical_to_spec(("batch", "seq", "heads", "head_dim"), rules)
    kv_spec = partitioning.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    ids_spec = partitioning.logical_to_spec(("batch", "seq"), rules)
    if segment_ids is None:  # one document per row
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    local = _ring if mode == "ring" else _all_gather
    return jax.shard_map(
        lambda q, k, v, ids: local(q, k, v, ids, axis=axis, n=n, implementation=implementation),
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec),
        out_specs=q_spec,
    )(q, k, v, segment_ids)


def _all_gather(q, k, v, ids, *, axis: str, n: int, implementation):
    """Local query block [B, L/n, ...] against the gathered sequence [B, L, ...]."""
    del n
    k_all, v_all, ids_all = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, ids))
    offset = jax.lax.axis_index(axis) * q.shape[1]  # position of the first local query
    return kernels.attention(
        q,
        k_all,
        v_all,
        causal=True,
        segment_ids=(ids, ids_all),
        q_offset=offset,
        implementation=implementation,
    )


def _ring(q, k, v, ids, *, axis: str, n: int, implementation):
    """Zig-zag ring attention on local blocks [B, L/n, ...] (natural order in and out)."""
    q, k, v, ids = (_to_zigzag(x, axis, n) for x in (q, k, v, ids))
    c = q.shape[1] // 2  # chunk length; local blocks are [chunk r, chunk 2n-1-r]
    me = jax.lax.axis_index(axis)

    def attend(qb, kb, vb, q_ids, kv_ids, causal=False):
        out, lse = kernels.attention(
            qb,
            kb,
            vb,
            causal=causal,
            segment_ids=(q_ids, kv_ids),
            return_lse=True,
            implementation=implementation,
        )
        return out.astype(jnp.float32), lse  # [B, T, H, Dh], [B, H, T]

    # Own block: both local chunks are in sequence order, so plain causal is exact.
    out, lse = attend(q, k, v, ids, ids, causal=True)

    def hop(carry, step):
        out, lse, k, v, kv_ids = carry
        k, v, kv_ids = (_shift(x, axis, n) for x in (k, v, kv_ids))  # now holds device me-step's
        source = (me - step) % n

        def from_earlier():  # chunk `source` < both local chunks; chunk 2n-1-source > both
            return attend(q, k[:, :c], v[:, :c], ids, kv_ids[:, :c])

        def from_later():  # only local chunk 2n-1-me comes after both visiting chunks
            o, l = attend(q[:, c:], k, v, ids[:, c:], kv_ids)
            o = jnp.concatenate([jnp.zeros_like(o), o], axis=1)
            l = jnp.concatenate([jnp.full_like(l, -jnp.inf), l], axis=2)
            return o, l

        o, l = jax.lax.cond(source < me, from_earlier, from_later)
        out, lse = merge(out, lse, o, l)
        return (out, lse, k, v, kv_ids), None

    (out, _, _, _, _), _ = jax.lax.scan(hop, (out, lse, k, v, ids), jnp.arange(1, n))
    return _from_zigzag(out.astype(q.dtype), axis, n)


def merge(out_a, lse_a, out_b, lse_b):
    """Combines attention over two disjoint key sets from their outputs [B, T, H, Dh] and
    log-sum-exps [B, H, T]; rows that see no key in either stay zero with lse -inf."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)  # [B, H, T], 0 where lse is -inf
    total = w_a + w_b
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, m + jnp.log(total), -jnp.inf)

    def weight(w):  # [B, H, T] -> [B, T, H, 1]
        return (w / total).transpose(0, 2, 1)[..., None]

    return out_a * weight(w_a) + out_b * weight(w_b), lse


def _shift(x, axis: str, n: int):
    """Sends each device's block to the next device on the ring."""
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def _zigzag_home(chunk: int, n: int) -> int:
    """The device that holds natural chunk `chunk` of 2n in the zig-zag layout."""
    return chunk if chunk < n else 2 * n - 1 - chunk


def _to_zigzag(x, axis: str, n: int):
    """Device r's contiguous chunks (2r, 2r+1) -> its zig-zag chunks (r, 2n-1-r), along dim 1.

    Of a device's two zig-zag chunks one is even and one odd, so one ppermute moves all even
    chunks and another all odd ones."""
    c = x.shape[1] // 2
    even = jax.lax.ppermute(x[:, :c], axis, [(r, _zigzag_home(2 * r, n)) for r in range(n)])
    odd = jax.lax.ppermute(x[:, c:], axis, [(r, _zigzag_home(2 * r + 1, n)) for r in range(n)])
    first_is_even = jax.lax.axis_index(axis) % 2 == 0  # chunk r is even
    return jnp.where(
        first_is_even,
        jnp.concatenate([even, odd], axis=1),
        jnp.concatenate([odd, even], axis=1),
    )


def _from_zigzag(x, axis: str, n: int):
    """The inverse of `_to_zigzag`."""
    c = x.shape[1] // 2
    first_is_even = jax.lax.axis_index(axis) % 2 == 0
    even = jnp.where(first_is_even, x[:, :c], x[:, c:])
    odd = jnp.where(first_is_even, x[:, c:], x[:, :c])
    even = jax.lax.ppermute(even, axis, [(_zigzag_home(2 * r, n), r) for r in range(n)])
    odd = jax.lax.ppermute(odd, axis, [(_zigzag_home(2 * r + 1, n), r) for r in range(n)])
    return jnp.concatenate([even, odd], axis=1)
