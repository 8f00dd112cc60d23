"""The long-context study's own pieces: a model's weights under another RoPE scaling (the
zero-shot YaRN row) and the token-weighted position bands of its table."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.studies import long_context
from llm.model.config import ModelConfig, RopeScaling
from llm.model.transformer import Transformer


def test_with_rope_keeps_the_weights_and_changes_the_rope():
    cfg = ModelConfig(
        vocab_size=64, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64,
        max_seq_len=64,
    )  # fmt: skip
    scaling = RopeScaling(type="yarn", factor=4.0, original_max_position=16)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    reference = Transformer(dataclasses.replace(cfg, rope_scaling=scaling), rngs=nnx.Rngs(0))
    tokens = jnp.arange(48)[None] % 61
    scaled = long_context.with_rope(model, scaling)
    assert scaled.cfg.rope_scaling == scaling and model.cfg.rope_scaling.type == "none"
    np.testing.assert_allclose(scaled(tokens), reference(tokens), atol=1e-6)
    # the rope did change: small at initialization (near-uniform attention), far above 1e-6
    assert np.abs(scaled(tokens) - model(tokens)).max() > 1e-4


def test_position_bands_weigh_buckets_by_their_tokens():
    row = {
        "position_starts": [0, 256, 512, 768],
        "position_loss": [1.0, 2.0, math.nan, 4.0],  # an empty bucket's mean is NaN
        "position_tokens": [10, 30, 0, 5],
    }
    assert long_context.bucket_mean(row, 0, 512) == (1.0 * 10 + 2.0 * 30) / 40
    assert long_context.bucket_mean(row, 512, 1024) == 4.0
    assert math.isnan(long_context.bucket_mean(row, 1024, 2048))
