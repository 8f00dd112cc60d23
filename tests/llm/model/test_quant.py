"""llm.model.quant: fake quantization against a numpy quantize-dequantize, straight-through
gradients, int4 packing, post-training quantized weights, experts' hidden activations and native
sparse attention layers quantized, the int8 KV cache, bad configs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_transformer import stacked_copy  # pytest puts this directory on sys.path

from llm.errors import ConfigError
from llm.model import quant, quant_ops
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer, init_cache

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 32)).astype(np.float32)  # [tokens, K]
W = (RNG.normal(size=(32, 16)) * 0.1).astype(np.float32)  # [K, N]


def ref_int(x: np.ndarray, axis: int, bits: int, xp=np) -> np.ndarray:
    """Symmetric absmax quantize-dequantize over `axis` (numpy, the reference; xp=jnp inside jit)."""
    qmax = 2 ** (bits - 1) - 1
    scale = xp.abs(x).max(axis=axis, keepdims=True) / qmax
    return xp.clip(xp.round(x / scale), -qmax, qmax) * scale


def ref_fp8(x: np.ndarray, dtype) -> np.ndarray:
    fmax = float(ml_dtypes.finfo(dtype).max)
    scale = np.abs(x).max() / fmax
    return (x / scale).astype(dtype).astype(np.float32) * scale


def ref_int4_groups(w: np.ndarray, group: int) -> np.ndarray:
    k, n = w.shape
    return ref_int(w.reshape(k // group, group, n), 1, 4).reshape(k, n)


def test_fake_quantization_equals_a_reference_quantize_dequantize():
    np.testing.assert_allclose(
        quant_ops.fake_weight(W, (0,), "int8", 8), ref_int(W, 0, 8), rtol=1e-6
    )
    np.testing.assert_allclose(quant_ops.fake_activation(X, "int8"), ref_int(X, 1, 8), rtol=1e-6)
    np.testing.assert_allclose(
        quant_ops.fake_weight(W, (0,), "int4_weights", 8), ref_int4_groups(W, 8), rtol=1e-6
    )
    e4m3 = ml_dtypes.float8_e4m3fn
    np.testing.assert_allclose(
        quant_ops.fake_weight(W, (0,), "fp8", 8), ref_fp8(W, e4m3), rtol=1e-6
    )
    np.testing.assert_allclose(quant_ops.fake_activation(X, "fp8"), ref_fp8(X, e4m3), rtol=1e-6)
    # int8 and fp8 matmuls: the dequantized operands' product, simulated and as a real
    # low-precision dot_general (int8 x int8 -> int32; e4m3 x e4m3 -> float32)
    for mode, ref in (("int8", ref_int(X, 1, 8) @ ref_int(W, 0, 8)), ("fp8", None)):
        ref = ref if ref is not None else ref_fp8(X, e4m3) @ ref_fp8(W, e4m3)
        for real in (False, True):
            np.testing.assert_allclose(
                quant_ops.qmatmul(X, W, mode, real), ref, rtol=1e-5, atol=1e-6
            )
    # a multi-axis weight ([H, Dh, D], contracted over H x Dh) in groups, stored and read back
    w3 = W.reshape(4, 8, 16)
    q, scale = quant_ops.quantize_weight(jnp.asarray(w3), (0, 1), "int4", 8)
    assert q.dtype == jnp.int8 and int(jnp.abs(q).max()) <= 7
    np.testing.assert_allclose(
        quant_ops.dequantize_weight(q, scale, (0, 1), jnp.float32).reshape(32, 16),
        ref_int4_groups(W, 8),
        rtol=1e-6,
    )


def test_gradients_are_straight_through():
    c = RNG.normal(size=W.shape).astype(np.float32)
    for mode in ("int8", "int4_weights", "fp8"):
        g = jax.grad(lambda w, mode=mode: jnp.sum(quant_ops.fake_weight(w, (0,), mode, 8) * c))(W)
        np.testing.assert_array_equal(g, c)  # the identity: as if unquantized
    g_out = RNG.normal(size=(6, 16)).astype(np.float32)
    for mode in ("int8", "fp8"):
        dx, dw = jax.grad(
            lambda x, w, mode=mode: jnp.sum(quant_ops.qmatmul(x, w, mode, False) * g_out), (0, 1)
        )(X, W)
        if mode == "int8":
            xd, wd, g = ref_int(X, 1, 8), ref_int(W, 0, 8), g_out
        else:  # e4m3 operands, the output gradient in e5m2
            e4m3 = ml_dtypes.float8_e4m3fn
            xd, wd, g = ref_fp8(X, e4m3), ref_fp8(W, e4m3), ref_fp8(g_out, ml_dtypes.float8_e5m2)
        np.testing.assert_allclose(dx, g @ wd.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dw, xd.T @ g, rtol=1e-5, atol=1e-6)


def test_int4_packing_round_trips_exactly():
    q = jnp.asarray(RNG.integers(-8, 8, size=(6, 4, 10)), jnp.int8)
    q = q.at[0, 0, :].set(jnp.array([-8, -7, -1, 0, 1, 7, 6, -2, 3, -4], jnp.int8))  # every nibble
    for axis in (0, 2, -1):
        packed = quant_ops.pack_int4(q, axis)
        assert packed.dtype == jnp.uint8 and packed.shape[axis] == q.shape[axis] // 2
        np.testing.assert_array_equal(quant_ops.unpack_int4(packed, axis), q)
    # the layout: element 2i in the low nibble, 2i + 1 in the high one
    low_high = quant_ops.pack_int4(jnp.array([[-1, 2], [3, -8]], jnp.int8), 1)
    np.testing.assert_array_equal(low_high[:, 0], [0x2F, 0x83])


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
    stored = jnp.int8 if weights == "int8" else jnp.uint8  # int4: packed two a byte
    assert w_up.dtype == stored and model.embed[...].dtype == stored  # tied head
    float_w_up = np.asarray(tiny().blocks[0].mlp.w_up[...])
    expected = ref_int(float_w_up, 0, 8) if weights == "int8" else ref_int4_groups(float_w_up, 32)
    np.testing.assert_allclose(
        quant_ops.dequantize_weight(w_up, scale, (0,), jnp.float32), expected, rtol=1e-6
    )
    err = relative_error(forward(model, TOKENS), float_logits)
    assert 0 < err < PTQ_TOLERANCE[(weights, mode)], err


@pytest.mark.parametrize("weights, mode", [("int8", "int8"), ("int4", "none")])
def test_stacked_layers_are_quantized_per_layer(weights, mode):
    """scan_layers=True: each layer's slice of a stacked weight is quantized as that layer alone
    would be (scales keep the leading layers axis), so the logits equal the per-layer model's."""
    loop = tiny(targets="attention,mlp,head", mode=mode, weights=weights)
    scan = stacked_copy(loop, dataclasses.replace(loop.cfg, scan_layers=True))
    for model in (loop, scan):
        quant.quantize_model(model, model.cfg.quant)
    stacked, first = scan.blocks.mlp.w_up_scale[...], loop.blocks[0].mlp.w_up_scale[...]
    assert stacked.shape == (TINY["num_layers"], *first.shape)
    np.testing.assert_array_equal(stacked[0], first)
    np.testing.assert_allclose(forward(scan, TOKENS), forward(loop, TOKENS), atol=1e-5)


# weight -> its input axes in a tiny model; int4 is packed along the last (llm.model.quant)
INPUT_AXES = {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1), "w_gate": (0,), "w_up": (0,),
              "w_down": (0,), "embed": (1,)}  # fmt: skip


def test_int4_weights_are_packed_and_give_the_unpacked_paths_logits():
    fields = {"targets": "attention,mlp,head", "weights": "int4"}
    model, unpacked, float_model = tiny(**fields), tiny(**fields), tiny()
    quant.quantize_model(model, model.cfg.quant)
    quant.quantize_model(unpacked, unpacked.cfg.quant)
    trios = [(model, unpacked, float_model)]  # the tied head
    for i in range(TINY["num_layers"]):
        for part in ("attn", "mlp"):
            trios.append(tuple(getattr(m.blocks[i], part) for m in (model, unpacked, float_model)))
    for packed_mod, unpacked_mod, float_mod in trios:
        for name, axes in INPUT_AXES.items():
            if not hasattr(packed_mod, f"{name}_scale"):
                continue
            packed, full = getattr(packed_mod, name)[...], getattr(float_mod, name)[...]
            assert packed.dtype == jnp.uint8 and packed.shape[axes[-1]] * 2 == full.shape[axes[-1]]
            assert packed.size * 2 == full.size  # half a byte a weight
            scale = getattr(packed_mod, f"{name}_scale")[...]
            q = quant_ops.unpack_int4(packed, axes[-1])  # the unpacked path: one value a byte
            np.testing.assert_array_equal(quant_ops.pack_int4(q, axes[-1]), packed)
            np.testing.assert_array_equal(
                quant_ops.dequantize_weight(packed, scale, axes, jnp.float32),
                quant_ops.dequantize_weight(q, scale, axes, jnp.float32),
            )
            deq = quant_ops.dequantize_weight(q, scale, axes, jnp.float32)
            k = math.prod(full.shape[: len(axes)])  # [K, N] with the inputs merged
            as_k_n = (lambda a: a.T) if name == "embed" else (lambda a, k=k: a.reshape(k, -1))
            np.testing.assert_allclose(  # and it is the reference int4 quantize-dequantize
                as_k_n(deq), ref_int4_groups(as_k_n(np.asarray(full)), 32), rtol=1e-6
            )
            setattr(unpacked_mod, name, nnx.Param(q))
    assert unpacked.blocks[0].attn.wo[...].dtype == jnp.int8
    np.testing.assert_array_equal(forward(model, TOKENS), forward(unpacked, TOKENS))


def test_experts_hidden_activations_are_quantized_under_qat_int8():
    from llm.model import moe
    from llm.model.config import MoEConfig

    cfg = ModelConfig(**{**TINY, "num_layers": 1}, moe=MoEConfig(num_experts=4, top_k=2,
                      expert_mlp_dim=32), quant={"mode": "int8", "targets": "experts"})  # fmt: skip
    layer = moe.MoE(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(RNG.normal(size=(2, 8, 64)), jnp.float32)
    y, _ = nnx.jit(lambda m, x: m(x))(layer, x)
    # reference: int8 quantize-dequantize of the weights (per output channel), of the input and
    # of the hidden activations (per token), then the float layer
    w = tuple(ref_int(np.asarray(getattr(layer, n)[...]), 1, 8) for n in moe.EXPERT_WEIGHTS)
    args = (ref_int(np.asarray(x), 2, 8), layer.router[...], jnp.zeros(4), w, cfg.moe, jnp.float32)
    want, _ = moe.moe_ffn(*args, hidden=lambda h: ref_int(h, h.ndim - 1, 8, jnp))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    unquantized_hidden, _ = moe.moe_ffn(*args)
    assert not np.allclose(y, unquantized_hidden, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields", [{"mode": "int4_weights"}, {"weights": "int8"}])
def test_native_sparse_attention_layers_are_quantized(fields):
    """QAT (int4 weights) and PTQ (int8 weights) reach all four NSA projections: the logits
    equal a float model holding the reference quantize-dequantized weights."""
    nsa_fields = {"attention_pattern": "sliding,nsa", "attention_window": 8,
                  "attention_nsa_block": 4, "attention_nsa_selected": 2}  # fmt: skip
    cfg = ModelConfig(**TINY, **nsa_fields, quant={"group_size": 32, "targets": "attention",
                                                   **fields})  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    quant.quantize_model(model, cfg.quant)
    ref = Transformer(ModelConfig(**TINY, **nsa_fields), rngs=nnx.Rngs(0))
    assert type(ref.blocks[1].attn).__name__ == "NativeSparseAttention"
    for block, ref_block in zip(model.blocks, ref.blocks, strict=True):
        for name in ("wq", "wk", "wv", "wo"):
            var = getattr(ref_block.attn, name)
            n_in = 64 if name != "wo" else 4 * 16  # D, or H x Dh
            w = np.asarray(var[...]).reshape(n_in, -1)  # [K, N]: the inputs merged
            fake = ref_int(w, 0, 8) if "weights" in fields else ref_int4_groups(w, 32)
            var[...] = jnp.asarray(fake.reshape(var.shape))
            stored = getattr(block.attn, name)[...].dtype
            assert stored == (jnp.int8 if "weights" in fields else jnp.float32)
    got, want = forward(model, TOKENS), forward(ref, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, forward(Transformer(ref.cfg, rngs=nnx.Rngs(0)), TOKENS))


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
