"""The plain loss: materializes the [batch, seq, vocab] logits (what the chunked kernel must equal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def losses(
    lse: jax.Array, target_logit: jax.Array, weights: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array]:
    """Summed weighted loss (cross-entropy + z_loss·lse²) and summed weighted cross-entropy alone.

    lse, target_logit, weights: f32[B, L] (log-partition, logit of the target, token weight).
    """
    ce = (lse - target_logit) * weights
    return jnp.sum(ce + z_loss * jnp.square(lse) * weights), jnp.sum(ce)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float, one_hot: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`losses` of logits: f32[B, L, V]; targets: int32[B, L]; weights: f32[B, L].

    one_hot: the target's logit as a sum over a one-hot mask instead of a gather, for logits
    split over the vocabulary inside a partly manual shard_map (a pipeline stage), where XLA's
    SPMD partitioner cannot split the gather; it costs another pass over the logits.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    if one_hot:
        hit = jnp.arange(logits.shape[-1]) == targets[..., None]  # [B, L, V]
        target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    else:
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return losses(lse, target_logit, weights, z_loss)


def linear_cross_entropy(
    hidden: jax.Array, unembed: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy` of logits = hidden [B, L, D] @ unembed [D, V], accumulated in float32."""
    logits = jnp.einsum("bld,dv->blv", hidden, unembed, preferred_element_type=jnp.float32)
    return cross_entropy(logits, targets, weights, z_loss)
