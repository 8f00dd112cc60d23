"""`linear_cross_entropy`: the output projection and softmax cross-entropy as one function.

    loss_sum, ce_sum = linear_cross_entropy(hidden, unembed, targets, weights, z_loss=1e-4)

"chunked" (chunked.py) never materializes the [batch, seq, vocab] logits, forward or backward;
"xla" (reference.py) does, and defines what "chunked" must compute.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from kernels.cross_entropy import chunked, reference

IMPLEMENTATIONS = ("chunked", "xla")
_log = logging.getLogger(__name__)


def _validate(hidden, unembed, targets, weights, z_loss, vocab_chunk, seq_block) -> None:
    if hidden.ndim != 3 or unembed.ndim != 2:
        raise ValueError(
            f"hidden must be [batch, seq, embed] and unembed [embed, vocab], got shapes "
            f"{hidden.shape} and {unembed.shape}"
        )
    if hidden.shape[2] != unembed.shape[0]:
        raise ValueError(
            f"hidden's embed ({hidden.shape[2]}) differs from unembed's ({unembed.shape[0]})"
        )
    if hidden.dtype != unembed.dtype or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise ValueError(
            f"hidden and unembed must share a floating dtype, got {hidden.dtype} and {unembed.dtype}"
        )
    for name, x in (("targets", targets), ("weights", weights)):
        if x.shape != hidden.shape[:2]:
            raise ValueError(f"{name} must be [batch, seq] = {hidden.shape[:2]}, got {x.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    for name, size in (("vocab_chunk", vocab_chunk), ("seq_block", seq_block)):
        if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise ValueError(f"{name} must be a positive integer, got {size!r}")


def linear_cross_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float = 0.0,
    implementation: str = "chunked",
    vocab_chunk: int = 4096,
    seq_block: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Summed weighted loss (cross-entropy + z_loss·lse²) and summed weighted cross-entropy of
    logits = hidden [B, L, D] @ unembed [D, V] (float32 accumulation); targets int[B, L],
    weights f32[B, L] (0 masks a token).

    "chunked" visits the logits in [B, seq_block, vocab_chunk] tiles; a chunk (block)
    that does not divide V (L) leaves a shorter last one; one larger than V (L) is one chunk
    (block), which is logged.
    """
    _validate(hidden, unembed, targets, weights, z_loss, vocab_chunk, seq_block)
    if implementation == "xla":
        return reference.linear_cross_entropy(hidden, unembed, targets, weights, z_loss)
    if implementation != "chunked":
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    seq, vocab = hidden.shape[1], unembed.shape[1]
    if seq_block > seq:
        _log.info("cross-entropy seq_block=%d > sequence %d: one block of %d", seq_block, seq, seq)
    if vocab_chunk > vocab:
        _log.info("cross-entropy vocab_chunk=%d > vocabulary %d: one chunk", vocab_chunk, vocab)
    lse, target_logit = chunked.lse_and_target_logit(
        hidden, unembed, targets, min(vocab_chunk, vocab), min(seq_block, seq)
    )
    return reference.losses(lse, target_logit, weights.astype(jnp.float32), z_loss)
