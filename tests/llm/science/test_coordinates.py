"""llm.science.coordinates: the per-layer-type RMS equals a plain layer-by-layer reference
(post-norms, MoE and scanned layers included), and the width slope of a power law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.model.config import ModelConfig
from llm.model.transformer import Transformer
from llm.science import coordinates

CFG = {"vocab_size": 64, "num_layers": 2, "embed_dim": 32, "num_heads": 4, "num_kv_heads": 2}


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _reference(model: Transformer, tokens) -> dict[str, float]:
    """Each block applied by hand (pre-norm, residual adds), the sizes taken along the way."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed[...][tokens]
    sizes = {"embedding": _rms(x), "attention": [], "mlp": [], "residual": []}
    for block in model.blocks:
        h, _ = block.attn(block.attn_norm(x), positions, None, None)
        h = block.attn_post_norm(h) if block.post_norms else h
        x = x + h
        sizes["attention"].append(_rms(h))
        h = block.mlp(block.mlp_norm(x))
        h = h[0] if block.is_moe else h
        h = block.mlp_post_norm(h) if block.post_norms else h
        x = x + h
        sizes["mlp"].append(_rms(h))
        sizes["residual"].append(_rms(x))
    sizes["logits"] = _rms(model.final_norm(x) @ model.embed[...].T)
    return {k: float(np.mean(v)) for k, v in sizes.items()}


@pytest.mark.parametrize(
    "overrides",
    [{}, {"post_norms": True}, {"moe": {"num_experts": 4, "top_k": 2, "expert_mlp_dim": 32}}],
    ids=["dense", "post_norms", "moe"],
)
def test_activation_rms_equals_a_layer_by_layer_reference(overrides):
    model = Transformer(ModelConfig(**CFG, **overrides), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    got = coordinates.activation_rms(model, tokens)
    assert set(got) == set(coordinates.LAYER_TYPES)
    want = _reference(model, tokens)
    for kind in coordinates.LAYER_TYPES:
        assert float(got[kind]) == pytest.approx(want[kind], rel=1e-5), kind


def test_scanned_layers_give_the_same_sizes():
    """The same weights stacked for a scan over the layers: the same statistics."""
    plain_model = Transformer(ModelConfig(**CFG), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(Transformer(ModelConfig(**CFG, scan_layers=True), rngs=nnx.Rngs(0)))
    weights = nnx.to_pure_dict(nnx.state(plain_model))
    blocks = [weights["blocks"][i] for i in range(CFG["num_layers"])]
    weights["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)
    nnx.replace_by_pure_dict(state, weights)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)), jnp.int32)
    plain = coordinates.activation_rms(plain_model, tokens)
    scanned = coordinates.activation_rms(nnx.merge(graphdef, state), tokens)
    for kind in coordinates.LAYER_TYPES:
        assert float(scanned[kind]) == pytest.approx(float(plain[kind]), rel=1e-5), kind


def test_width_slope_of_a_power_law():
    widths = [32, 64, 128, 256]
    assert coordinates.width_slope(widths, [3.0 * w**0.5 for w in widths]) == pytest.approx(0.5)
    assert coordinates.width_slope(widths, [2.0] * 4) == pytest.approx(0.0, abs=1e-12)
