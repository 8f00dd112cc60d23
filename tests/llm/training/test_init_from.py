"""`config.init_from`: a new run starts from a run's checkpoint or a Hugging Face directory with
a fresh optimizer; its own resume ignores the source; a wrong source is one line."""

import jax
import numpy as np
import pytest
from flax import nnx

from llm import config as config_lib
from llm import hf, train
from llm.errors import ConfigError
from llm.model.transformer import Transformer
from llm.training import checkpoint, workdir
from llm.training.metrics import read_metrics

# Two steps, a checkpoint after each; step 1 trains at learning rate 0 (the warmup's start).
FIRST_STEP = {"steps": 2, "eval_every": 0, "checkpoint_every": 1, "optimizer.warmup_steps": 1}


def _params(path, config, step=None):
    exp = config_lib.resolve(config)
    model = nnx.eval_shape(lambda: Transformer(exp.model, rngs=nnx.Rngs(0)))
    return checkpoint.restore_params(path, nnx.state(model), step)


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_config_shared):
    path = tmp_path_factory.mktemp("source") / "run"
    config = config_lib.with_overrides(tiny_config_shared, {"eval_every": 0})
    train.train_and_evaluate(config, str(path))  # checkpoints at steps 3 and 6
    return path


def test_a_run_starts_from_a_checkpoint_with_a_fresh_optimizer(source, tmp_path, tiny_config):
    config = config_lib.with_overrides(
        tiny_config,
        {"init_from": f"workdir:{source}@3", **FIRST_STEP},
    )
    run = tmp_path / "run"
    train.train_and_evaluate(config, str(run))
    assert read_metrics(run)[0]["learning_rate"] == 0.0  # a fresh warmup: the weights stay
    _assert_equal(_params(run, config, step=1), _params(source, config, step=3))
    assert workdir.read_history(run)[0]["config"]["init_from"] == f"workdir:{source}@3"
    # Its resume is its own: a later start with more steps restores run's checkpoint.
    train.train_and_evaluate(config_lib.with_overrides(config, {"steps": 3}), str(run))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_run_starts_from_a_hugging_face_directory(source, tmp_path, tiny_config):
    exp = config_lib.resolve(tiny_config)
    model = nnx.eval_shape(lambda: Transformer(exp.model, rngs=nnx.Rngs(0)))
    nnx.update(model, _params(source, tiny_config))
    hf.save(model, str(tmp_path / "hf"))
    config = config_lib.with_overrides(
        tiny_config,
        {"init_from": f"hf:{tmp_path / 'hf'}", **FIRST_STEP},
    )
    train.train_and_evaluate(config, str(tmp_path / "run"))
    _assert_equal(_params(tmp_path / "run", config, step=1), _params(source, tiny_config))


@pytest.mark.parametrize(
    "spec, fields, error, message",
    [
        ("elsewhere:/x", {}, ConfigError, "must be workdir:DIR, workdir:DIR@STEP or hf:DIR"),
        ("workdir:{tmp}/missing", {}, ConfigError, "missing/checkpoints not found"),
        ("hf:{tmp}", {}, ConfigError, "config.json not found"),
        ("workdir:{source}@4", {}, checkpoint.CheckpointNotFoundError, r"its steps are \[3, 6\]"),
        (
            "workdir:{source}",
            {"model.mlp_dim": 96},
            checkpoint.CheckpointMismatchError,
            "blocks/0/mlp/w_down/value: saved float32",
        ),
    ],
)
def test_a_wrong_source_is_one_line(source, tmp_path, tiny_config, spec, fields, error, message):
    spec = spec.format(tmp=tmp_path, source=source)
    config = config_lib.with_overrides(tiny_config, {"init_from": spec, **fields})
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
