"""Layouts: every mesh of the default rules table trains exactly like one device, and places
each parameter (and its optimizer state) where the table says."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm import config as config_lib
from llm import train
from llm.parallel import partitioning
from llm.training import loop
from llm.training.step import cross_entropy

# Measured max deviation from one device, float32, over all LAYOUTS: losses 1.1e-7 relative,
# per-token gradients 1.1e-8 absolute (largest |g| 2.6e-2), parameters after 3 AdamW steps 3.7e-7.
RTOL, ATOL = 1e-5, 1e-6
STEPS = 3
LAYOUTS = [
    {"data": 8},
    {"fsdp": 8},
    {"data": 4, "tensor": 2},
    {"fsdp": 4, "tensor": 2},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 2, "expert": 4},  # a dense model: the expert axis splits the batch
    {"data": 2, "sequence": 4, "context_parallel": "ring"},
    {"data": 2, "sequence": 4, "context_parallel": "all_gather"},
]
# The default table, restated: which mesh axis each logical parameter axis lives on.
EXPECTED_AXIS = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def batches(config, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    b, length = config.batch_size, config.seq_len
    out = []
    for _ in range(count):
        tokens = rng.integers(0, config.model.vocab_size, (b, length + 1)).astype(np.int32)
        out.append(
            {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)),
                "segment_ids": np.ones((b, length), np.int32),
                "weights": np.ones((b, length), np.float32),
            }
        )
    return out


def with_mesh(config, sizes: dict):
    """`config` on the mesh `sizes` (its "context_parallel" entry, if any, sets the model's)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    fields = {"model.context_parallel": sizes.pop("context_parallel", "ring")}
    fields.update({f"mesh.{axis}": size for axis, size in sizes.items()})
    return config_lib.with_overrides(config, fields)


def run(config, devices) -> dict:
    """Gradients at the initial state, then STEPS train steps; everything back on the host."""
    mesh = partitioning.make_mesh(config.mesh.to_dict(), devices=devices)
    config_lib.resolve(config).check_fits(mesh)
    rules = tuple(config.axis_rules)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        setup = loop.setup_state(config_lib.resolve(config), mesh)
        data = [
            jax.device_put(b, partitioning.batch_sharding(mesh, rules))
            for b in batches(config, STEPS)
        ]

        def loss(params, batch):
            logits = nnx.merge(setup.graphdef, params)(
                batch["inputs"], batch["positions"], batch["segment_ids"]
            )
            loss_sum, _ = cross_entropy(logits, batch["targets"], batch["weights"], config.z_loss)
            return loss_sum / jnp.sum(batch["weights"])  # per token, as the train step averages

        grads = jax.jit(jax.grad(loss))(setup.state.params, data[0])
        step = loop.compile_train_step(config_lib.resolve(config), setup, data[0])
        state, losses = setup.state, []
        for batch in data:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return {"mesh": mesh, "state": state, "losses": losses, "grads": jax.device_get(grads)}


_REFERENCE: dict = {}


def reference(config) -> dict:
    """The one-device run, computed once per test session."""
    if not _REFERENCE:
        _REFERENCE.update(run(with_mesh(config, {}), jax.devices()[:1]))
    return _REFERENCE


def variables(tree):
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [v for v in leaves if isinstance(v, nnx.Variable)]


@pytest.mark.parametrize("sizes", LAYOUTS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_layout_matches_one_device_and_the_rules_table(tiny_config, sizes):
    ref = reference(tiny_config)
    got = run(with_mesh(tiny_config, sizes), jax.devices())
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(ref["grads"])):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    state, mesh = got["state"], got["mesh"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)

    params = variables(state.params)
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    for placed in (params, variables(adam.mu), variables(adam.nu)):
        assert len(placed) == len(params)
        for var in placed:
            names = var.get_metadata()["out_sharding"]
            expected = [
                EXPECTED_AXIS.get(n) if sizes.get(EXPECTED_AXIS.get(n), 1) > 1 else None
                for n in names
            ]
            spec = tuple(var[...].sharding.spec) + (None,) * (
                len(names) - len(var[...].sharding.spec)
            )
            actual = [
                (a if isinstance(a, str) else None)
                if (a is None or mesh.shape.get(a, 1) > 1)
                else None
                for a in spec
            ]
            assert actual == expected, (names, var[...].sharding.spec)
            shard = var[...].addressable_shards[0].data.shape
            assert shard == tuple(
                d // (sizes[e] if e else 1) for d, e in zip(var[...].shape, expected)
            )


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (
            {"mesh.data": 1, "mesh.tensor": 8},
            config_lib.ConfigError,
            "config.model.num_heads=4 does not split",
        ),
        (
            {"mesh.data": 4, "mesh.tensor": 2, "model.num_kv_heads": 1},
            config_lib.ConfigError,
            "config.model.num_kv_heads=1",
        ),
        (
            {"mesh.data": 4, "mesh.tensor": 2, "model.mlp_dim": 129},
            config_lib.ConfigError,
            "config.model.mlp_dim=129",
        ),
        (
            {"mesh.data": 4, "mesh.tensor": 2, "model.vocab_size": 4097},
            config_lib.ConfigError,
            "config.model.vocab_size=4097",
        ),
        (
            {"mesh.data": 1, "mesh.fsdp": 8, "model.embed_dim": 60, "model.head_dim": 16},
            config_lib.ConfigError,
            "config.model.embed_dim=60 does not split over mesh.fsdp=8",
        ),
        (
            {"mesh.data": 8, "batch_size": 12},
            config_lib.ConfigError,
            "use a multiple of 8 for config.batch_size",
        ),
        ({"mesh.data": 3}, partitioning.MeshError, "multiply to 3, but there are 8 devices"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, partitioning.MeshError, "at most one axis may be -1"),
        (
            {"mesh.data": 2, "mesh.sequence": 4, "seq_len": 36},
            config_lib.ConfigError,
            "config.seq_len=36 does not split into 8 chunks",
        ),
        (
            {"mesh.data": 2, "mesh.sequence": 4, "seq_len": 34},
            config_lib.ConfigError,
            "config.seq_len=34 does not split over mesh.sequence=4",
        ),
        (
            {
                "mesh.data": 2,
                "mesh.sequence": 4,
                "model.attention_pattern": "sliding",
                "model.attention_window": 8,
            },
            config_lib.ConfigError,
            "context parallelism (mesh.sequence=4) supports dense causal attention only",
        ),
        (
            {"model.context_parallel": "ulysses"},
            config_lib.ConfigError,
            "config.model.context_parallel='ulysses'",
        ),
        (
            {"mesh.data": 2, "mesh.expert": 4, "model.moe.num_experts": 6},
            config_lib.ConfigError,
            "config.model.moe.num_experts=6 does not split over mesh.expert=4",
        ),
        (
            {"mesh.tensor": 0},
            config_lib.ConfigError,
            "config.mesh.tensor must be a positive integer or -1",
        ),
        (
            {"axis_rules": (("embed", "model"),)},
            config_lib.ConfigError,
            "unknown mesh axes ['model']",
        ),
    ],
)
def test_mesh_mistakes_are_named_before_compiling(tmp_path, tiny_config, fields, error, message):
    config = config_lib.with_overrides(tiny_config, fields)
    with pytest.raises(error, match=re.escape(message)):
        train.train_and_evaluate(config, str(tmp_path))
