"""Output projection + cross-entropy over vocabulary chunks and sequence blocks, never the logits.

The forward pass visits each (sequence block, vocabulary chunk) tile of the logits once, keeping
an online log-sum-exp (running max and rescaled sum) and the target's logit per token. The custom
VJP saves only the inputs and the log-sum-exp; the backward pass recomputes each tile's logits,
turns them into d(loss)/d(logits) = d_lse·softmax + d_target·onehot, and accumulates
d(hidden) and d(unembed) tile by tile. Peak temporary memory is a few [B, seq_block, vocab_chunk]
tiles plus a float32 d(unembed), instead of several [B, L, V] arrays.

A vocabulary (or sequence) that the chunk (block) does not divide ends with a shorter chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _tiles(total: int, size: int, body: Callable[[Any, Any, int], Any], carry: Any) -> Any:
    """carry = body(carry, start, length) over [0, total) in pieces of `size`, the last shorter
    if `size` does not divide `total` (a loop over the full pieces, then the rest)."""
    full, rest = divmod(total, size)
    if full:
        carry = lax.fori_loop(0, full, lambda i, c: body(c, i * size, size), carry)
    if rest:
        carry = body(carry, full * size, rest)
    return carry


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D a @ b contracting a's axis contract[0] with b's contract[1], accumulated in float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """h: [B, T, D] @ w: [D, C] -> f32[B, T, C], as one 2-D matmul over the flattened tokens."""
    b, t, d = h.shape
    return _matmul(h.reshape(b * t, d), w, (1, 0)).reshape(b, t, w.shape[1])


def _is_target(targets: jax.Array, start: Any, size: int) -> jax.Array:
    """bool[B, T, size]: column j of the chunk starting at `start` is token (b, t)'s target."""
    return (targets - start)[..., None] == jnp.arange(size)


def _slice(x: jax.Array, start: Any, size: int, axis: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _forward(
    hidden: jax.Array, unembed: jax.Array, targets: jax.Array, vocab_chunk: int, seq_block: int
) -> tuple[jax.Array, jax.Array]:
    batch, seq, _ = hidden.shape
    vocab = unembed.shape[1]

    def block(out, s, t):
        lse_all, target_all = out
        h, y = _slice(hidden, s, t, 1), _slice(targets, s, t, 1)  # [B, T, D], [B, T]

        def chunk(stats, c, n):
            running_max, running_sum, target_logit = stats  # [B, T] each
            logits = _logits(h, _slice(unembed, c, n, 1))  # [B, T, n]
            new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
            running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
                jnp.exp(logits - new_max[..., None]), axis=-1
            )
            target_logit += jnp.sum(jnp.where(_is_target(y, c, n), logits, 0.0), axis=-1)
            return new_max, running_sum, target_logit

        zeros = jnp.zeros((batch, t), F32)
        init = (jnp.full((batch, t), -jnp.inf, F32), zeros, zeros)
        running_max, running_sum, target_logit = _tiles(vocab, vocab_chunk, chunk, init)
        lse = running_max + jnp.log(running_sum)
        return (
            lax.dynamic_update_slice_in_dim(lse_all, lse, s, 1),
            lax.dynamic_update_slice_in_dim(target_all, target_logit, s, 1),
        )

    zeros = jnp.zeros((batch, seq), F32)
    return _tiles(seq, seq_block, block, (zeros, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def lse_and_target_logit(
    hidden: jax.Array, unembed: jax.Array, targets: jax.Array, vocab_chunk: int, seq_block: int
) -> tuple[jax.Array, jax.Array]:
    """log-sum-exp and target logit, f32[B, L] each, of logits = hidden [B, L, D] @ unembed [D, V]
    (float32 accumulation), with targets int[B, L]; tiles of seq_block x vocab_chunk."""
    return _forward(hidden, unembed, targets, vocab_chunk, seq_block)


def _fwd(hidden, unembed, targets, vocab_chunk, seq_block):
    lse, target_logit = _forward(hidden, unembed, targets, vocab_chunk, seq_block)
    return (lse, target_logit), (hidden, unembed, targets, lse)


def _bwd(vocab_chunk, seq_block, residuals, cotangents):
    hidden, unembed, targets, lse = residuals
    d_lse, d_target = cotangents  # f32[B, L] each
    batch, seq, dim = hidden.shape
    vocab = unembed.shape[1]

    def block(grads, s, t):
        d_hidden, d_unembed = grads
        h, y = _slice(hidden, s, t, 1), _slice(targets, s, t, 1)  # [B, T, D], [B, T]
        block_lse, block_d_lse, block_d_target = (
            _slice(x, s, t, 1) for x in (lse, d_lse, d_target)
        )
        h2 = h.reshape(batch * t, dim)

        def chunk(acc, c, n):
            d_h, d_unembed = acc  # f32[B, T, D], f32[D, V]
            w = _slice(unembed, c, n, 1)  # [D, n]
            probs = jnp.exp(_logits(h, w) - block_lse[..., None])  # softmax over the vocabulary
            d_logits = block_d_lse[..., None] * probs
            d_logits += jnp.where(_is_target(y, c, n), block_d_target[..., None], 0.0)
            d_logits = d_logits.astype(hidden.dtype).reshape(batch * t, n)
            d_h += _matmul(d_logits, w, (1, 1)).reshape(batch, t, dim)
            d_w = _slice(d_unembed, c, n, 1) + _matmul(h2, d_logits, (0, 0))  # [D, n]
            return d_h, lax.dynamic_update_slice_in_dim(d_unembed, d_w, c, 1)

        init = (jnp.zeros((batch, t, dim), F32), d_unembed)
        d_h, d_unembed = _tiles(vocab, vocab_chunk, chunk, init)
        d_hidden = lax.dynamic_update_slice_in_dim(d_hidden, d_h.astype(hidden.dtype), s, 1)
        return d_hidden, d_unembed

    init = (jnp.zeros_like(hidden), jnp.zeros(unembed.shape, F32))
    d_hidden, d_unembed = _tiles(seq, seq_block, block, init)
    return d_hidden, d_unembed.astype(unembed.dtype), None


lse_and_target_logit.defvjp(_fwd, _bwd)
