"""llm.model.lora: adapters against a plain reference (W + s A B, values and gradients), merged ==
unmerged, QLoRA's int8 and NF4 bases, dropout, and the one-line errors for bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.errors import ConfigError
from llm.model import lora
from llm.model.config import ModelConfig, MoEConfig
from llm.model.lora import LoRAConfig
from llm.model.transformer import Transformer

SMALL = {
    "vocab_size": 64,
    "num_layers": 2,
    "embed_dim": 32,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_dim": 64,
}
MOE = MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=32, num_shared_experts=1)
ALL = ("q", "k", "v", "o", "gate", "up", "down")
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)


@nnx.jit
def logits(model: Transformer, key: jax.Array | None = None) -> jax.Array:
    """The model's logits on TOKENS (compiled: op by op is slow), with adapter dropout from key."""
    with lora.dropout_key(key):
        return model(TOKENS)


@nnx.jit(static_argnums=(0, 1))
def adapted(cfg: ModelConfig, lora_cfg: LoRAConfig) -> Transformer:
    """A model with adapters whose B is random (trained-looking), not zero."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    lora.attach(model, lora_cfg, seed=0)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, lora.Adapter):
            key = jax.random.key(module.index)
            module.b[...] = 0.1 * jax.random.normal(key, module.b.shape)
    return model


def reference_logits(model) -> jax.Array:
    """The plain reference: every adapted weight replaced by W + (alpha / r) A B, computed here."""
    plain = nnx.clone(model)
    for _, module in list(nnx.iter_modules(plain)):
        for name, _ in getattr(type(module), "lora_targets", ()):
            ad = lora.adapter(module, name)
            if ad is None:
                continue
            a, b = ad.a[...], ad.b[...]
            a2 = a.reshape(*a.shape[: ad.lead], -1, a.shape[-1])
            b2 = b.reshape(*b.shape[: ad.lead], b.shape[ad.lead], -1)
            base = getattr(module, name)[...]
            setattr(module, name, nnx.Param(base + (ad.scale * (a2 @ b2)).reshape(base.shape)))
            delattr(module, f"{name}_lora")
    return plain(TOKENS)


@pytest.mark.parametrize(
    "kwargs,targets",
    [({}, ALL), ({"moe": MOE}, ("q", "o", "experts", "gate", "down"))],
    ids=["dense", "moe"],
)
def test_adapters_equal_the_merged_reference_values_and_gradients(kwargs, targets):
    cfg = ModelConfig(**SMALL, **kwargs)
    model = adapted(cfg, LoRAConfig(rank=4, alpha=8.0, targets=targets))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(adapters, reference: bool):
        m = nnx.merge(graphdef, adapters, rest)
        logits = reference_logits(m) if reference else m(TOKENS)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, ours), g_ours = grad_fn(adapters, False)
    (_, ref), g_ref = grad_fn(adapters, True)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert jnp.abs(ours - logits(Transformer(cfg, rngs=nnx.Rngs(0)))).max() > 1e-2  # B != 0 shows
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
    assert len(jax.tree.leaves(g_ours)) == 2 * len(
        [t for _, m in nnx.iter_modules(model) for _, t in getattr(type(m), "lora_targets", ())
         if t in targets]
    )  # fmt: skip


@nnx.jit
def merged_copy(model: Transformer) -> Transformer:
    merged = nnx.clone(model)
    lora.merge(merged)
    return merged


@pytest.mark.parametrize("quantize", ["none", "int8", "nf4"])
def test_merged_equals_unmerged(quantize):
    model = adapted(ModelConfig(**SMALL), LoRAConfig(rank=4, quantize=quantize))
    merged = merged_copy(model)
    assert not nnx.state(merged, nnx.LoRAParam) and not nnx.state(merged, lora.QuantizedBase)
    np.testing.assert_allclose(logits(merged), logits(model), atol=1e-5)


@pytest.mark.parametrize("quantize,bits,tolerance", [("int8", 8, 0.5 / 127), ("nf4", 4, 0.17)])
def test_quantized_base_is_close_and_small(quantize, bits, tolerance):
    cfg = ModelConfig(**SMALL)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    w = model.blocks[0].mlp.w_down[...]  # [F, D]
    lora.attach(model, LoRAConfig(rank=2, quantize=quantize), seed=0)
    q = model.blocks[0].mlp.w_down
    assert isinstance(q, lora.Quantized)
    assert q.codes[...].size * 8 == w.size * bits
    # error within half a step of each block's absmax (nf4: its widest gap between levels / 2)
    absmax = jnp.max(jnp.abs(w), axis=0 if quantize == "int8" else None)
    assert jnp.all(jnp.abs(q.dequantize(jnp.float32) - w) <= tolerance * absmax + 1e-7)
    levels = np.asarray(lora.NF4)
    if quantize == "nf4":  # exactly representable values come back exactly
        block = jnp.asarray(levels[np.arange(w.size) % 16].reshape(w.shape), jnp.float32)
        np.testing.assert_array_equal(
            lora.Quantized(block, ("mlp", "embed"), "nf4", (0,)).dequantize(jnp.float32), block
        )


def test_dropout_masks_adapter_inputs_only_under_a_key():
    model = adapted(ModelConfig(**SMALL), LoRAConfig(rank=4, dropout=0.5))
    plain = logits(model)
    a, b, c = (logits(model, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)  # a pure function of the key
    assert jnp.abs(a - plain).max() > 1e-3 and jnp.abs(a - c).max() > 1e-3
    np.testing.assert_array_equal(logits(model), plain)  # no key (evaluation): no dropout


def test_adapters_carry_their_weights_logical_names():
    model = adapted(ModelConfig(**SMALL), LoRAConfig(rank=4, targets=("q", "o", "down")))
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    names = {k: v.get_metadata()["out_sharding"] for k, v in {
        "qa": attn.wq_lora.a, "qb": attn.wq_lora.b, "oa": attn.wo_lora.a, "ob": attn.wo_lora.b,
        "da": mlp.w_down_lora.a, "db": mlp.w_down_lora.b}.items()}  # fmt: skip
    assert names == {
        "qa": ("embed", None), "qb": (None, "heads", "head_dim"),
        "oa": ("heads", "head_dim", None), "ob": (None, "embed"),
        "da": ("mlp", None), "db": (None, "embed"),
    }  # fmt: skip
    assert lora.adapter(attn, "wk") is None and lora.adapter(mlp, "w_gate") is None


@pytest.mark.parametrize(
    "lora_kwargs,model_kwargs,match",
    [
        ({"rank": 4, "targets": ("experts",)}, {}, r"\['experts'\] name no layer"),
        ({"rank": 4, "targets": ("q", "attn")}, {}, "unknown: \\['attn'\\]"),
        ({"rank": 40, "targets": ("q",)}, {}, "rank=40 is larger than the q projection"),
        ({"rank": 4, "dropout": 1.0}, {}, "dropout must be in"),
        ({"rank": 0, "quantize": "int8"}, {}, "needs adapters"),
        ({"rank": 4, "quantize": "int4"}, {}, "quantize must be one of"),
        ({"rank": 4, "dropout": 0.1}, {"scan_layers": True}, "scan_layers=False"),
        ({"rank": -1}, {}, "rank must be an integer"),
    ],
)
def test_bad_configs_are_one_line_errors(lora_kwargs, model_kwargs, match):
    with pytest.raises(ConfigError, match=match) as error:
        LoRAConfig(**lora_kwargs).check_model(ModelConfig(**SMALL, **model_kwargs))
    assert "\n" not in str(error.value)
