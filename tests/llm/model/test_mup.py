"""muP (llm.model.mup): the initialization and learning-rate table per parameter, the attention and
logit multipliers against plain references, muP at its base width equal to sp bit for bit over a
few train steps, unchanged FLOPs, and one-line config errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.attention.reference import attention_reference
from llm.errors import ConfigError
from llm.hf_arch import check_saveable
from llm.model import mup
from llm.model.config import ModelConfig
from llm.model.layers import dense
from llm.model.transformer import Transformer
from llm.science import flops
from llm.training.optimizer import OptimizerConfig, make_optimizer
from llm.training.state import TrainState
from llm.training.step import LossConfig, make_train_step

BASE = {"vocab_size": 97, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
BASE |= {"qkv_bias": True, "qk_norm": True}
MOE = {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "shared_expert_gate": True}
M = 4  # width multiplier of the wide models: embed_dim 128 over base 32


def config(width: int = 32, parametrization: str = "mup", **overrides) -> ModelConfig:
    fields = {
        **BASE,
        "embed_dim": width,
        "mlp_dim": 2 * width,
        "moe": {**MOE, "expert_mlp_dim": width},
    }
    fields.update(parametrization=parametrization, mup_base_width=32, tie_embeddings=False)
    return ModelConfig(**{**fields, **overrides})


# The table of llm.model.mup, written out per parameter name: (init std factor, lr factor) at m.
EXPECTED = {
    "embed": (1, 1),
    "scale": (1, 1),
    "bq": (1, 1),
    "bk": (1, 1),
    "bv": (1, 1),
    **dict.fromkeys(("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), (M**-0.5, 1 / M)),
    "router": (1 / M, 1 / M),
    "shared_gate": (1 / M, 1 / M),
    "unembed": (1, 1),
}


def _params(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Parameter path -> value of a fresh model (seed 0)."""
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return {jax.tree_util.keystr(p): (p, np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(params)}  # fmt: skip


@pytest.mark.parametrize("readout", ["multiplier", "zero"])
def test_initialization_follows_the_table(readout):
    """Each parameter is sp's draw (same seed, same width) times its factor, and the factors are
    the table's; the hidden weights' variance is 0.02² / m (∝ 1/fan_in)."""
    sp, mu = (_params(config(128, p, mup_readout=readout)) for p in ("sp", "mup"))
    names = set()
    for key, (path, value) in mu.items():
        name = mup.param_name(path)
        names.add(name)
        want = EXPECTED[name][0] if not (name == "unembed" and readout == "zero") else 0.0
        np.testing.assert_allclose(value, sp[key][1] * want, rtol=1e-6, err_msg=key)
    assert names == set(EXPECTED)  # every role is exercised
    wq = mu["['blocks'][0]['attn']['wq'].value"][1]
    assert np.std(wq) == pytest.approx(0.02 / math.sqrt(M), rel=0.05)


def test_learning_rate_multipliers_follow_the_table():
    """One AdamW step of every parameter: muP's update is sp's times the table's factor."""
    cfg = config(128)
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01) + 0.001 * x, params)
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    updates = {}
    for multipliers in (None, mup.lr_multipliers(cfg)):
        tx, _ = make_optimizer(opt, steps=10, lr_multiplier=multipliers)
        updates[multipliers is None] = tx.update(grads, tx.init(params), params)[0]
    flat_sp = dict(jax.tree_util.tree_leaves_with_path(updates[True]))
    for path, got in jax.tree_util.tree_leaves_with_path(updates[False]):
        want = flat_sp[path] * EXPECTED[mup.param_name(path)][1]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    zero = config(128, mup_readout="zero")
    assert mup.lr_multiplier(zero, "unembed") == 1 / M
    assert mup.lr_multipliers(config(128, "sp")) is None


def test_attention_scores_scale_as_one_over_head_dim():
    """Under muP an attention layer equals the reference attention with scale sqrt(base Dh) / Dh."""
    cfg = config(128, qkv_bias=False, qk_norm=False)  # Dh = 32, base Dh = 8
    assert (cfg.head_dim, cfg.mup_base_head_dim) == (32, 8)
    block = Transformer(cfg, rngs=nnx.Rngs(0)).blocks[0]
    x = jax.random.normal(jax.random.key(1), (2, 8, 128))
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    got, _ = block.attn(x, positions, None, None)
    sp_attn = nnx.merge(*nnx.split(block.attn))
    sp_attn.cfg = dataclasses.replace(cfg, parametrization="sp")  # same weights, sp's projections
    q, k, v = sp_attn.project(x, positions)
    mask = jnp.tril(jnp.ones((8, 8), bool))
    out = attention_reference(q, k, v, mask=mask, softmax_scale=math.sqrt(8) / 32)
    want = dense(out, block.attn.wo[...], in_dims=2)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_are_multiplied_by_base_width_over_width(tied):
    """logits = final hidden states @ unembed x (32 / 128), on the plain path and in
    `unembedding()`, which the chunked loss uses."""
    cfg = config(128, tie_embeddings=tied)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(16).reshape(2, 8) % 97
    hidden, _, _ = model.hidden_states(tokens)
    weight = model.embed[...].T if tied else model.unembed[...]
    np.testing.assert_allclose(model(tokens), dense(hidden, weight) / M, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.unembedding(), weight / M, rtol=1e-7)


def _batch() -> dict:
    tokens = np.random.default_rng(0).integers(0, 97, (2, 17))
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
        "segment_ids": jnp.ones((2, 16), jnp.int32),
        "weights": jnp.ones((2, 16), jnp.float32),
    }


def _train(cfg: ModelConfig, steps: int, loss: LossConfig | None = None):
    """(losses, final parameters) of `steps` AdamW steps on one batch, as llm.train builds them."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
    tx, schedule = make_optimizer(opt, steps, mup.lr_multipliers(cfg))
    trainable, _ = nnx.split_state(params, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable), guard={})
    step = jax.jit(
        make_train_step(
            graphdef, tx, schedule, grad_accum_steps=1, z_loss=1e-4, loss=loss or LossConfig()
        )
    )
    losses = []
    for _ in range(steps):
        state, metrics = step(state, _batch())
        losses.append(float(metrics["loss"]))
    return losses, state.params


@pytest.mark.parametrize("tied", [True, False])
def test_mup_at_its_base_width_is_sp_bit_for_bit(tied):
    """Same init, same logits, same updates: identical losses and parameters over 3 steps (MoE,
    biases and qk-norm included)."""
    sp_losses, sp_params = _train(config(32, "sp", tie_embeddings=tied), 3)
    mu_losses, mu_params = _train(config(32, "mup", tie_embeddings=tied), 3)
    assert mu_losses == sp_losses
    for a, b in zip(jax.tree.leaves(mu_params), jax.tree.leaves(sp_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_chunked_loss_sees_the_logit_multiplier():
    """Off its base width, muP trains the same with the fused chunked loss as with the plain one."""
    cfg = config(64, moe={})
    plain, _ = _train(cfg, 2)
    chunked, _ = _train(cfg, 2, LossConfig(impl="chunked", vocab_chunk=40, seq_block=8))
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)


def test_flops_are_unchanged():
    for width in (32, 128):
        sp, mu = config(width, "sp"), config(width, "mup")
        assert flops.train_flops_per_token(mu, 64) == flops.train_flops_per_token(sp, 64)
        assert flops.param_counts(mu) == flops.param_counts(sp)


def test_hf_export_refuses_mup_off_its_base_width():
    dense_only = {"moe": {}, "qkv_bias": False, "qk_norm": False}
    check_saveable(config(32, **dense_only))  # at the base width muP is sp
    with pytest.raises(ConfigError, match="parametrization='mup'"):
        check_saveable(config(64, **dense_only))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parametrization": "mu_p"}, r"config.model.parametrization='mu_p' is not one of"),
        (
            {"mup_base_width": None},
            r"config.model.mup_base_width must be a positive integer.*got None",
        ),
        ({"mup_base_width": 0}, r"config.model.mup_base_width must be a positive integer.*got 0"),
        ({"mup_base_width": 30}, r"mup_base_width=30 is not divisible by config.model.num_heads=4"),
        ({"mup_base_head_dim": -8}, r"config.model.mup_base_head_dim must be a positive integer"),
        ({"mup_readout": "zeros"}, r"config.model.mup_readout='zeros' is not one of"),
        (
            {"mup_readout": "zero", "tie_embeddings": True},
            r"set --config.model.tie_embeddings=False",
        ),
        ({"attention_pattern": "nsa", "moe": {}}, r"native sparse attention"),
        ({"query_pre_attn_scalar": 64.0}, r"query_pre_attn_scalar"),
    ],
)
def test_bad_mup_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        config(64, **overrides)
    assert "\n" not in str(error.value)


def test_sp_ignores_the_mup_fields():
    cfg = config(64, "sp", mup_base_width=None)
    assert cfg.width_multiplier == 1.0 and mup.query_multiplier(cfg) == 1.0
    assert mup.logit_multiplier(cfg) == 1.0
