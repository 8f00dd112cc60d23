"""llm.model.quant: fake quantization against a numpy quantize-dequantize, straight-through
gradients, post-training quantized weights, the int8 KV cache, bad configs."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from llm.errors import ConfigError
from llm.model import quant
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer, init_cache

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 32)).astype(np.float32)  # [tokens, K]
W = (RNG.normal(size=(32, 16)) * 0.1).astype(np.float32)  # [K, N]


def ref_int(x: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Symmetric absmax quantize-dequantize over `axis` (numpy, the reference)."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(x).max(axis=axis, keepdims=True) / qmax
    return np.clip(np.round(x / scale), -qmax, qmax) * scale


def ref_fp8(x: np.ndarray, dtype) -> np.ndarray:
    fmax = float(ml_dtypes.finfo(dtype).max)
    scale = np.abs(x).max() / fmax
    return (x / scale).astype(dtype).astype(np.float32) * scale


def ref_int4_groups(w: np.ndarray, group: int) -> np.ndarray:
    k, n = w.shape
    return ref_int(w.reshape(k // group, group, n), 1, 4).reshape(k, n)


def test_fake_quantization_equals_a_reference_quantize_dequantize():
    np.testing.assert_allclose(quant.fake_weight(W, (0,), "int8", 8), ref_int(W, 0, 8), rtol=1e-6)
    np.testing.assert_allclose(quant.fake_activation(X, "int8"), ref_int(X, 1, 8), rtol=1e-6)
    np.testing.assert_allclose(
        quant.fake_weight(W, (0,), "int4_weights", 8), ref_int4_groups(W, 8), rtol=1e-6
    )
    e4m3 = ml_dtypes.float8_e4m3fn
    np.testing.assert_allclose(quant.fake_weight(W, (0,), "fp8", 8), ref_fp8(W, e4m3), rtol=1e-6)
    np.testing.assert_allclose(quant.fake_activation(X, "fp8"), ref_fp8(X, e4m3), rtol=1e-6)
    # int8 and fp8 matmuls: the dequantized operands' product, simulated and as a real
    # low-precision dot_general (int8 x int8 -> int32; e4m3 x e4m3 -> float32)
    for mode, ref in (("int8", ref_int(X, 1, 8) @ ref_int(W, 0, 8)), ("fp8", None)):
        ref = ref if ref is not None else ref_fp8(X, e4m3) @ ref_fp8(W, e4m3)
        for real in (False, True):
            np.testing.assert_allclose(quant.qmatmul(X, W, mode, real), ref, rtol=1e-5, atol=1e-6)
    # a multi-axis weight ([H, Dh, D], contracted over H x Dh) in groups, stored and read back
    w3 = W.reshape(4, 8, 16)
    q, scale = quant.quantize_weight(jnp.asarray(w3), (0, 1), "int4", 8)
    assert q.dtype == jnp.int8 and int(jnp.abs(q).max()) <= 7
    np.testing.assert_allclose(
        quant.dequantize_weight(q, scale, (0, 1), jnp.float32).reshape(32, 16),
        ref_int4_groups(W, 8),
        rtol=1e-6,
    )


def test_gradients_are_straight_through():
    c = RNG.normal(size=W.shape).astype(np.float32)
    for mode in ("int8", "int4_weights", "fp8"):
        g = jax.grad(lambda w, mode=mode: jnp.sum(quant.fake_weight(w, (0,), mode, 8) * c))(W)
        np.testing.assert_array_equal(g, c)  # the identity: as if unquantized
    g_out = RNG.normal(size=(6, 16)).astype(np.float32)
    for mode in ("int8", "fp8"):
        dx, dw = jax.grad(
            lambda x, w, mode=mode: jnp.sum(quant.qmatmul(x, w, mode, False) * g_out), (0, 1)
        )(X, W)
        if mode == "int8":
            xd, wd, g = ref_int(X, 1, 8), ref_int(W, 0, 8), g_out
        else:  # e4m3 operands, the output gradient in e5m2
            e4m3 = ml_dtypes.float8_e4m3fn
            xd, wd, g = ref_fp8(X, e4m3), ref_fp8(W, e4m3), ref_fp8(g_out, ml_dtypes.float8_e5m2)
        np.testing.assert_allclose(dx, g @ wd.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dw, xd.T @ g, rtol=1e-5, atol=1e-6)


TINY = {"vocab_size": 128, "num_layers": 2, "embed_dim": 64, "num_heads": 4, "num_kv_heads": 2}
TINY["mlp_dim"] = 128
TOKENS = jnp.asarray(RNG.integers(0, 128, size=(2, 16)), jnp.int32)


def tiny(**quant_fields) -> Transformer:
    cfg = ModelConfig(**TINY, quant={"group_size": 32, **quant_fields})
    return Transformer(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model: Transformer, tokens: jax.Array, cache=None):
    return model(tokens, cache=cache)


@pytest.fixture(scope="module")
def float_logits() -> jax.Array:
    return forward(tiny(), TOKENS)


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# PTQ: stated relative errors of the logits (float32 model, random init, all targets)
PTQ_TOLERANCE = {("int8", "none"): 0.02, ("int8", "int8"): 0.03, ("int4", "none"): 0.2}


@pytest.mark.parametrize("weights, mode", list(PTQ_TOLERANCE))
def test_post_training_quantized_logits(weights, mode, float_logits):
    model = tiny(targets="attention,mlp,head", mode=mode, weights=weights)  # same init as ref
    quant.quantize_model(model, model.cfg.quant)
    w_up, scale = model.blocks[0].mlp.w_up[...], model.blocks[0].mlp.w_up_scale[...]
    assert w_up.dtype == jnp.int8 and model.embed[...].dtype == jnp.int8  # tied head
    float_w_up = np.asarray(tiny().blocks[0].mlp.w_up[...])
    expected = ref_int(float_w_up, 0, 8) if weights == "int8" else ref_int4_groups(float_w_up, 32)
    np.testing.assert_allclose(
        quant.dequantize_weight(w_up, scale, (0,), jnp.float32), expected, rtol=1e-6
    )
    err = relative_error(forward(model, TOKENS), float_logits)
    assert 0 < err < PTQ_TOLERANCE[(weights, mode)], err


def test_int8_kv_cache_decodes_close_to_float():
    model = tiny()
    outs = {}
    for int8 in (False, True):
        cache = init_cache(model.cfg, 2, 24, int8=int8)
        logits, cache = forward(model, TOKENS, cache)  # prefill
        steps = [logits[:, -1]]
        for t in range(4):
            logits, cache = forward(model, TOKENS[:, t : t + 1], cache)
            steps.append(logits[:, -1])
        outs[int8] = jnp.stack(steps)
    assert init_cache(model.cfg, 2, 24, int8=True)["k"]["q"].dtype == jnp.int8
    err = relative_error(outs[True], outs[False])
    assert 0 < err < 0.01, err  # stated: 1% of the logits' norm
    np.testing.assert_array_equal(outs[True].argmax(-1), outs[False].argmax(-1))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mode": "int3"}, "config.quant.mode='int3' is not one of"),
        (
            {"targets": "attention,router"},
            "config.quant.targets='attention,router' names ['router']",
        ),
        ({"targets": ""}, "names nothing"),
        ({"mode": "int4_weights", "group_size": 48}, "group_size=48 does not divide"),
        ({"group_size": 0}, "config.quant.group_size must be a positive integer"),
    ],
)
def test_bad_quant_configs_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**TINY, quant=fields)
    assert message in str(e.value) and "\n" not in str(e.value)


QAT_TOLERANCE = 0.05  # stated: |final train loss (QAT int8) - float's| after the tiny run's 6 steps


def test_qat_int8_trains_close_to_float(tiny_run, tiny_config, tmp_path):
    from llm import config as config_lib
    from llm import train
    from llm.training.metrics import last_per_step, read_metrics

    config = config_lib.with_overrides(tiny_config, {"quant.mode": "int8", "eval_every": 0})
    train.train_and_evaluate(config, str(tmp_path))
    qat, ref = (last_per_step(read_metrics(d)) for d in (tmp_path, tiny_run))
    assert qat[6]["loss"] < qat[1]["loss"] - 0.1  # it learns
    assert qat[6]["loss"] != ref[6]["loss"]  # quantized: not the float run
    assert abs(qat[6]["loss"] - ref[6]["loss"]) < QAT_TOLERANCE, (qat[6], ref[6])
