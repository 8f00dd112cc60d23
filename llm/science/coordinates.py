"""Activation sizes per layer type: the statistics of muP's coordinate check (llm.mup_check) and
of `config.debug.log_activation_rms` (metrics.jsonl), computed here only.

The RMS of every coordinate of each layer type's output: the token embeddings, the attention and
MLP outputs and the residual stream after each block (averaged over the blocks), and the logits.
Under muP these stay the same size as the width grows; under sp, trained with Adam, they grow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.model.layers import rms
from llm.model.transformer import Transformer

LAYER_TYPES = ("embedding", "attention", "mlp", "residual", "logits")


def activation_rms(
    model: Transformer,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """tokens: int32[B, L] -> {layer type: f32[] RMS of its output} for `LAYER_TYPES`."""
    logits, aux = model(tokens, positions, segment_ids, return_aux=True, record_rms=True)
    blocks = [aux[i] for i in sorted(aux)]
    return {
        "embedding": rms(model.embed_tokens(tokens)),
        **{
            kind: jnp.mean(jnp.stack([block[f"rms_{kind}"] for block in blocks]))
            for kind in ("attention", "mlp", "residual")
        },
        "logits": rms(logits),
    }


def batch_rms(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> dict[str, jax.Array]:
    """`activation_rms` of the model (graphdef, params) on a training batch."""
    model = nnx.merge(graphdef, params)
    return activation_rms(model, batch["inputs"], batch["positions"], batch["segment_ids"])


def width_slope(widths: list[int], values: list[float]) -> float:
    """The least-squares slope of log2(value) against log2(width): 0 = flat, 1 = ∝ width."""
    slope, _ = np.polyfit(np.log2(widths), np.log2(values), 1)
    return float(slope)
