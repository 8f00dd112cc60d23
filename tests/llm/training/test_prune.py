"""config.prune: masks of exactly the requested sparsity and a valid N:M pattern (against numpy
references), pruned weights exactly 0 through AdamW steps and across a resume, the achieved
sparsity logged per layer, and bad configs refused in one line."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm import config as config_lib
from llm import train
from llm.errors import ConfigError
from llm.model.transformer import Transformer
from llm.training import checkpoint, prune
from llm.training.metrics import read_metrics


def test_magnitude_mask_prunes_exactly_the_smallest():
    w = np.asarray(jax.random.normal(jax.random.key(0), (24, 10)))
    for sparsity in (0.0, 0.3, 0.5, 0.95):
        mask = np.asarray(prune.magnitude_mask(jnp.asarray(w), jnp.float32(sparsity)))
        k = round(sparsity * w.size)
        assert (~mask).sum() == k
        reference = np.ones(w.size, bool)
        reference[np.argsort(np.abs(w).ravel(), kind="stable")[:k]] = False
        np.testing.assert_array_equal(mask.ravel(), reference)


@pytest.mark.parametrize("n, m, axis", [(2, 4, -2), (2, 4, -3), (1, 8, -1)])
def test_n_m_mask_keeps_the_n_largest_of_every_m(n, m, axis):
    w = np.asarray(jax.random.normal(jax.random.key(1), (16, 8, 8)))
    mask = np.asarray(prune.n_m_mask(jnp.asarray(w), n, m, axis))
    moved = np.moveaxis(np.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    kept = np.moveaxis(mask, axis, -1).reshape(groups.shape)
    assert (kept.sum(-1) == n).all()
    threshold = np.sort(groups, axis=-1)[..., m - n : m - n + 1]  # the n-th largest of a group
    np.testing.assert_array_equal(kept, groups >= threshold)


def test_schedule_is_the_cubic_ramp():
    cfg = prune.PruneConfig(method="magnitude", sparsity=0.8, start=10, end=20)
    for t in (0, 10, 13, 15, 20, 25):
        progress = min(max((t - 10) / 10, 0.0), 1.0)
        want = 0.8 * (1 - (1 - progress) ** 3)
        assert float(prune.schedule(cfg, jnp.int32(t))) == pytest.approx(want, abs=1e-6)


def _params(tiny_config, **overrides):
    exp = config_lib.resolve(config_lib.with_overrides(tiny_config, overrides))
    state = nnx.state(Transformer(exp.model, rngs=nnx.Rngs(0)))
    return nnx.split_state(state, nnx.Param, ...)[0]


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_pruned_weights_stay_zero_through_adamw_steps(tiny_config, method):
    """masked(adamw) over 5 steps of random gradients (weight decay on): the targets follow the
    schedule (2:4: from `start`), pruned weights are exactly 0 ever after, and every kept weight
    and other parameter trains as plain AdamW trains it."""
    params = _params(tiny_config, **{"model.moe.num_experts": 2, "model.moe.top_k": 1})
    cfg = prune.PruneConfig(
        method=method, sparsity=0.6, start=1, end=3, targets="attention,experts"
    )
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    tx = prune.masked(adamw, cfg)
    state, plain_state, plain = tx.init(params), adamw.init(params), params

    @jax.jit
    def steps(grads, state, params, plain_state, plain):
        updates, state = tx.update(grads, state, params)
        plain_updates, plain_state = adamw.update(grads, plain_state, plain)
        params, plain = (
            optax.apply_updates(params, updates),
            optax.apply_updates(plain, plain_updates),
        )
        return state, params, plain_state, plain

    pruned_before = {}
    for step in range(5):
        grads = jax.tree.map(
            lambda p, step=step: jax.random.normal(jax.random.key(step), p.shape), params
        )
        state, params, plain_state, plain = steps(grads, state, params, plain_state, plain)
        found = prune.targets(cfg, params)
        assert {k.split("]")[-2] for k in found} >= {"['wq'", "['wo'", "['w_up'"}
        for key, (variable, target, axis) in found.items():
            w = np.asarray(variable[...])
            zero = w == 0
            assert zero[pruned_before.get(key, np.zeros_like(zero))].all()  # stay pruned
            pruned_before[key] = zero
            if method == "magnitude":
                want = float(prune.schedule(cfg, jnp.int32(step)))
                assert zero.sum() == round(want * w.size), (key, step)
            elif step >= 1:
                groups = np.moveaxis(~zero, axis, -1).reshape(-1, 4)
                assert (groups.sum(-1) == 2).all(), key
    sparsity = jax.device_get(jax.jit(lambda p: prune.sparsity(cfg, p))(params))
    expected = 0.6 if method == "magnitude" else 0.5
    assert sparsity["sparsity/all"] == pytest.approx(expected, abs=1e-3)
    assert sparsity["sparsity/1/attention"] == pytest.approx(expected, abs=1e-3)
    assert "sparsity/0/mlp" not in sparsity  # not a target here
    # AdamW is elementwise: each kept weight is plain AdamW's (to an ulp: fusions differ).
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    plain = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(plain)}
    for key, w in leaves.items():
        kept = np.asarray(w) != 0
        np.testing.assert_allclose(
            np.asarray(w)[kept], np.asarray(plain[key])[kept], 1e-5, 1e-8, key
        )
        assert kept.all() or key in found, key


PRUNED_RUN = {
    "prune.method": "magnitude",
    "prune.sparsity": 0.5,
    "prune.start": 1,
    "prune.end": 4,
    "eval_every": 0,
}


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, tiny_config_shared):
    path = tmp_path_factory.mktemp("pruned") / "run"
    train.train_and_evaluate(config_lib.with_overrides(tiny_config_shared, PRUNED_RUN), str(path))
    return path


def _restored(path, config, step):
    exp = config_lib.resolve(config)
    model = nnx.eval_shape(lambda: Transformer(exp.model, rngs=nnx.Rngs(0)))
    return checkpoint.restore_params(path, nnx.state(model), step)


def test_a_pruned_run_logs_its_sparsity_and_resumes_exactly(pruned_run, tmp_path, tiny_config):
    records = read_metrics(pruned_run)
    assert records[0]["sparsity/all"] == 0.0  # step 1 = prune.start: ramp at 0
    assert records[-1]["sparsity/all"] == 0.5
    assert records[-1]["sparsity/0/attention"] == records[-1]["sparsity/1/mlp"] == 0.5
    config = config_lib.with_overrides(tiny_config, PRUNED_RUN)
    params = _restored(pruned_run, config, 6)
    # Resumed from its step 3 (its step 6 deleted): the same weights and zeros at step 6.
    run = tmp_path / "resumed"
    shutil.copytree(pruned_run, run)
    shutil.rmtree(run / "checkpoints" / "6")
    train.train_and_evaluate(config, str(run))
    resumed = _restored(run, config, 6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wq = np.asarray(params["blocks"][0]["attn"]["wq"][...])
    assert (wq == 0).mean() == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"prune.method": "magnitude", "prune.sparsity": 1.0},
            r"prune.sparsity must be in \[0, 1\)",
        ),
        (
            {"prune.method": "magnitude", "prune.sparsity": -0.1},
            r"prune.sparsity must be in \[0, 1\)",
        ),
        ({"prune.method": "3:2"}, "prune.method must be none, magnitude or N:M"),
        ({"prune.method": "magnitude", "prune.start": 5, "prune.end": 2}, "prune.end=2 is before"),
        (
            {"prune.method": "magnitude", "prune.targets": "mlp,norms"},
            r"unknown targets \['norms'\]",
        ),
        ({"prune.method": "magnitude", "prune.targets": "experts"}, "selects no weight"),
        (
            {"prune.method": "2:4", "model.mlp_dim": 130},
            r"w_down'\]\.value's input width 130 is not a multiple of 4",
        ),
    ],
)
def test_bad_prune_configs_are_one_line(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_lib.resolve(config_lib.with_overrides(tiny_config, overrides))
    assert "\n" not in str(error.value)
