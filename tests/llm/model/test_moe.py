"""Mixture of experts: dispatch against a per-token loop, the capacity rule, expert parallelism
against one device, loss-free balancing, and a tiny MoE model trained end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm import config as config_lib
from llm import train
from llm.model import config as model_config
from llm.model import moe
from llm.model.config import ModelConfig, MoEConfig
from llm.model.transformer import Transformer
from llm.parallel import partitioning
from llm.science import flops
from llm.training import checkpoint, loop, workdir
from llm.training.metrics import read_metrics

E, K, D, F = 4, 2, 16, 8


def layer(**moe_fields) -> moe.MoE:
    m = MoEConfig(num_experts=E, top_k=K, expert_mlp_dim=F, **moe_fields)
    cfg = ModelConfig(embed_dim=D, num_layers=2, num_heads=2, num_kv_heads=2, moe=m)
    return moe.MoE(cfg, rngs=nnx.Rngs(0))


def reference(x, router, w_gate, w_up, w_down, cfg: MoEConfig):
    """One token at a time: score, pick top_k, renormalize, sum the chosen experts' outputs."""
    ys, probs, load, z = [], [], jnp.zeros(E), 0.0
    for token in x.reshape(-1, D):
        logits = token @ router
        if cfg.router == "softmax_topk":
            scores = p = jax.nn.softmax(logits)
        else:
            scores = jax.nn.sigmoid(logits)
            p = scores / jnp.sum(scores)
        chosen = jnp.argsort(-jax.lax.stop_gradient(scores))[:K]
        gates = scores[chosen] / jnp.sum(scores[chosen])
        y = 0.0
        for g, e in zip(gates, chosen):
            h = jax.nn.silu(token @ w_gate[e]) * (token @ w_up[e])
            y = y + g * (h @ w_down[e])
            load = load.at[e].add(1.0)
        ys.append(y)
        probs.append(p)
        z = z + jax.nn.logsumexp(logits) ** 2
    t = len(ys)
    aux_loss = E * jnp.sum(load / (t * K) * jnp.mean(jnp.stack(probs), axis=0))
    return jnp.stack(ys).reshape(x.shape), aux_loss, z / t


@pytest.mark.parametrize("router", model_config.ROUTERS)
def test_dropless_equals_a_per_token_loop_values_and_gradients(router):
    mod = layer(router=router)
    x = jax.random.normal(jax.random.key(1), (1, 8, D))
    params = {n: getattr(mod, n)[...] * 10 for n in ("router", "w_gate", "w_up", "w_down")}
    cotangent = jax.random.normal(jax.random.key(2), x.shape)

    def ours(params, x):
        w = (params["w_gate"], params["w_up"], params["w_down"])
        y, aux = moe.moe_ffn(x, params["router"], jnp.zeros(E), w, mod.cfg.moe, jnp.float32)
        return jnp.sum(y * cotangent) + aux["aux_loss"] + aux["z_loss"]

    def loop(params, x):
        y, aux_loss, z = reference(x, **params, cfg=mod.cfg.moe)
        return jnp.sum(y * cotangent) + aux_loss + z

    got, got_grads = jax.value_and_grad(ours, argnums=(0, 1))(params, x)
    want, want_grads = jax.jit(jax.value_and_grad(loop, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got_grads[0]["router"]).max()) > 1e-3  # the router learns


def test_capacity_keeps_the_first_tokens_and_drops_the_rest():
    """Every token picks experts 0 and 1: C = ceil(1.0 * 16 * 2 / 4) = 8 slots each, so tokens
    0..7 (flattened [B, L] order) are computed and tokens 8..15 dropped."""
    mod = layer(dispatch="capacity", capacity_factor=1.0)
    x = jax.random.normal(jax.random.key(1), (2, 8, D)).at[..., 0].set(1.0)
    router = jnp.zeros((D, E)).at[0, 0].set(20.0).at[0, 1].set(10.0)
    w = (mod.w_gate[...], mod.w_up[...], mod.w_down[...])
    y, aux = moe.moe_ffn(x, router, jnp.zeros(E), w, mod.cfg.moe, jnp.float32)
    full, _ = moe.moe_ffn(
        x, router, jnp.zeros(E), w, MoEConfig(num_experts=E, top_k=K, expert_mlp_dim=F), "float32"
    )
    y, full = y.reshape(16, D), full.reshape(16, D)
    np.testing.assert_allclose(y[:8], full[:8], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(y[8:], 0.0)
    assert float(jnp.abs(full[8:]).min()) > 0
    assert float(aux["dropped"]) == 0.5
    np.testing.assert_allclose(aux["load"], [0.5, 0.5, 0.0, 0.0])


def test_loss_free_bias_moves_a_skewed_router_toward_balance():
    mod = layer(bias_update_rate=0.05)
    x = jax.random.normal(jax.random.key(1), (4, 16, D)).at[..., 0].set(1.0)
    mod.router[...] = mod.router[...].at[0, 0].add(0.3)  # expert 0 is everyone's favourite
    loads, biases = [], []
    for _ in range(12):
        _, aux = mod(x)
        loads.append(np.asarray(aux["load"]))
        mod.update_bias(aux["load"])
        biases.append(np.asarray(mod.expert_bias[...]))
    assert loads[0][0] > 0.45  # of 2 choices per token, expert 0 is nearly always one
    assert np.abs(loads[-1] - 1 / E).max() < 0.5 * np.abs(loads[0] - 1 / E).max()
    assert np.mean(biases, axis=0).argmin() == 0  # the favourite is held back the most


def test_stacked_moe_layers_equal_the_unstacked_ones_values_gradients_and_balancing():
    """scan_layers=True stacks the expert weights on a leading "layers" axis: the same logits,
    auxiliary values and gradients as the per-layer blocks holding the same weights, and one
    balancing step moves each layer's biases as it does there."""
    m = MoEConfig(
        num_experts=E, top_k=K, expert_mlp_dim=F, num_shared_experts=1, bias_update_rate=0.1
    )
    cfg = ModelConfig(
        vocab_size=32, num_layers=2, embed_dim=D, num_heads=2, num_kv_heads=2, mlp_dim=F, moe=m
    )
    loose = Transformer(cfg, rngs=nnx.Rngs(0))
    for i, block in enumerate(loose.blocks):  # biases that change the routing
        block.mlp.expert_bias[...] = jax.random.normal(jax.random.key(i), (E,)) * 0.05
    stacked = Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(1))
    names = nnx.state(stacked, nnx.Param)["blocks"]["mlp"]["w_gate"].get_metadata()
    assert names["out_sharding"] == ("layers", "expert", "embed", "mlp")
    pure = nnx.to_pure_dict(nnx.state(loose))
    pure["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *pure["blocks"].values())
    state = nnx.state(stacked)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(stacked, state)
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 32)
    cotangent = jax.random.normal(jax.random.key(3), (2, 8, 32))

    @jax.jit
    def value_and_grad(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            logits, aux = nnx.merge(graphdef, params, rest)(tokens, return_aux=True)
            return jnp.sum(logits * cotangent) + moe.weighted_aux_loss(aux, m), aux

        return jax.value_and_grad(loss, has_aux=True)(params)

    results = []
    for model in (loose, stacked):
        (value, aux), grads = value_and_grad(model)
        model.update_expert_biases({i: layer["load"] for i, layer in aux.items()})
        results.append((value, aux, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model))))
    (value, aux, grads, after), (value_s, aux_s, grads_s, after_s) = results
    np.testing.assert_allclose(value_s, value, rtol=1e-5)
    for want, got in zip(jax.tree.leaves(aux), jax.tree.leaves(aux_s)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for tree, tree_s in ((grads, grads_s), (after, after_s)):
        tree["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *tree["blocks"].values())
        for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_s)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(grads_s["blocks"]["mlp"]["w_gate"]).sum(axis=(1, 2, 3)) > 0)  # per layer
    assert np.any(after_s["blocks"]["mlp"]["expert_bias"] != pure["blocks"]["mlp"]["expert_bias"])


def test_active_parameters_count_top_k_and_shared_experts_only():
    m = MoEConfig(
        num_experts=8, top_k=2, expert_mlp_dim=4, first_dense_layers=1, num_shared_experts=1
    )
    cfg = ModelConfig(
        vocab_size=10, num_layers=3, embed_dim=8, num_heads=2, num_kv_heads=1, mlp_dim=16, moe=m
    )
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    counts = flops.param_counts(cfg)
    assert counts["total"] == sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expert = 3 * 8 * 4  # one SwiGLU expert
    # layers 1 and 2 are MoE: each skips 6 of its 8 routed experts per token.
    assert counts["active"] == counts["total"] - 2 * 6 * expert
    # attention 192 per layer, dense MLP 384, router 64 + 3 experts, tied output 80.
    assert counts["matmul"] == 3 * 192 + 384 + 2 * (64 + 3 * expert) + 80


def moe_config(tiny_config, **fields):
    overrides = {
        "model.moe.num_experts": 8,
        "model.moe.expert_mlp_dim": 32,
        "model.moe.first_dense_layers": 1,
        "model.moe.num_shared_experts": 1,
        "model.moe.bias_update_rate": 1e-3,
        **fields,
    }
    return config_lib.with_overrides(tiny_config, overrides)


def train_one_step(config, devices):
    """One train step of `config` on `devices`: metrics and the new state, on the host."""
    mesh = partitioning.make_mesh(config.mesh.to_dict(), devices=devices)
    config_lib.resolve(config).check_fits(mesh)
    rules = tuple(config.axis_rules)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (config.batch_size, config.seq_len + 1))
    shape = (config.batch_size, config.seq_len)
    batch = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
        "segment_ids": np.ones(shape, np.int32),
        "weights": np.ones(shape, np.float32),
    }
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        setup = loop.setup_state(config_lib.resolve(config), mesh)
        batch = jax.device_put(batch, partitioning.batch_sharding(mesh, rules))
        step = loop.compile_train_step(config_lib.resolve(config), setup, batch)
        state, metrics = step(setup.state, batch)
    return jax.device_get(metrics), jax.device_get(state), step.as_text()


_ONE_DEVICE: dict = {}


@pytest.mark.parametrize("dispatch", model_config.DISPATCHES)
def test_expert_parallel_equals_one_device(tiny_config, dispatch):
    """mesh expert=4 x data=2 against dropless on one device (capacity_factor=E: nothing dropped)."""
    config = moe_config(tiny_config, **{"model.moe.capacity_factor": 8.0})
    if not _ONE_DEVICE:
        one = config_lib.with_overrides(config, {"mesh.data": 1})
        _ONE_DEVICE["run"] = train_one_step(one, jax.devices()[:1])
    want, want_state, _ = _ONE_DEVICE["run"]
    parallel = {"mesh.data": 2, "mesh.expert": 4, "model.moe.dispatch": dispatch}
    got, got_state, hlo = train_one_step(config_lib.with_overrides(config, parallel), jax.devices())
    assert "all-to-all" in hlo
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    bias = got_state.params["blocks"][1]["mlp"]["expert_bias"][...]
    assert np.abs(bias).max() == pytest.approx(1e-3)  # one balancing step, taken in the jitted step


def test_a_tiny_moe_model_trains_and_logs_routing(tmp_path, tiny_config):
    config = moe_config(tiny_config, **{"model.moe.router": "sigmoid_topk"})
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_loss"])
    records = read_metrics(tmp_path)
    assert len(records) == config.steps
    last = records[-1]
    loads = [last[f"moe/layer_1/load_{e}"] for e in range(8)]
    assert sum(loads) == pytest.approx(1.0)
    for name in ("aux_loss", "z_loss", "dropped", "entropy", "bias_drift"):
        assert np.isfinite(last[f"moe/layer_1/{name}"])
    assert "moe/layer_0/load_0" not in last  # the first layer stays dense
    assert last["moe/layer_1/bias_drift"] > 0
    # The checkpoint holds the expert biases; a resume with other experts is refused by name.
    model = nnx.eval_shape(lambda: Transformer(config_lib.model_config(config), rngs=nnx.Rngs(0)))
    restored = checkpoint.restore_params(tmp_path, nnx.state(model))
    assert np.abs(restored["blocks"][1]["mlp"]["expert_bias"][...]).max() > 0
    other = config_lib.with_overrides(config, {"model.moe.num_experts": 4, "steps": 8})
    with pytest.raises(workdir.ResumeChangeError, match="model.moe.num_experts: 8 -> 4"):
        train.train_and_evaluate(other, str(tmp_path))
