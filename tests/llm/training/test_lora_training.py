"""LoRA / QLoRA training (llm.model.lora through the loop): the base stays as it started and has no
optimizer state, the adapters train, a resumed run equals an uninterrupted one bit for bit, and
llm.lora's memory accounting scales the optimizer state with the adapters only."""

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from llm import config as config_lib
from llm import lora as lora_cmd
from llm import runs, train
from llm.model import lora
from llm.training import loop
from llm.training.metrics import read_metrics
from llm.training.optimizer import make_optimizer

# QLoRA (int8 base) with dropout: the most state a resume has to get right.
LORA = {
    "lora.rank": 4,
    "lora.alpha": 8.0,
    "lora.dropout": 0.1,
    "lora.quantize": "int8",
    "lora.targets": ("q", "v", "o", "gate", "down"),
}


@pytest.fixture(scope="module")
def lora_config(tiny_config_shared):
    return config_lib.with_overrides(tiny_config_shared, LORA)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, lora_config):
    directory = tmp_path_factory.mktemp("lora_run")
    train.train_and_evaluate(lora_config, str(directory))
    return directory


def _flat(state) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(state))


def test_base_is_frozen_and_only_adapters_have_optimizer_state(lora_run, lora_config):
    exp = config_lib.resolve(lora_config)
    tx, _ = make_optimizer(exp.optimizer, exp.schedule_length)
    graphdef, _ = nnx.eval_shape(lambda: loop.fresh_state(exp, tx))
    fresh = jax.jit(lambda: loop.fresh_state(exp, tx)[1])()  # as the loop initializes it
    trained, _ = runs.load_run(str(lora_run))  # step 6
    fresh_base = _flat(nnx.state(nnx.merge(graphdef, fresh.params), nnx.Not(nnx.LoRAParam)))
    trained_base = _flat(nnx.state(trained, nnx.Not(nnx.LoRAParam)))
    assert fresh_base.keys() == trained_base.keys()
    assert any(str(v.dtype) == "int8" for v in trained_base.values())  # QLoRA's base
    for key, value in fresh_base.items():
        np.testing.assert_array_equal(trained_base[key], value, err_msg=str(key))
    adapters = _flat(nnx.state(trained, nnx.LoRAParam))
    assert all(np.any(v != 0) for k, v in adapters.items() if k[-1] == "b")  # B left 0: trained
    # AdamW's moments: one per adapter array, nothing for the base.
    mu = fresh.opt_state[1][0].mu
    assert (
        _flat(mu).keys()
        == _flat(nnx.state(nnx.merge(graphdef, fresh.params), nnx.LoRAParam)).keys()
    )
    losses = [r["loss"] for r in read_metrics(lora_run)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_resumed_lora_run_matches_an_uninterrupted_one(
    tmp_path, lora_run, lora_config, train_until_first_save
):
    expected = {r["step"]: r["loss"] for r in read_metrics(lora_run)}
    train_until_first_save(lora_config, str(tmp_path))
    train.train_and_evaluate(lora_config, str(tmp_path))
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path)} == expected  # bit-identical
    resumed, _ = runs.load_run(str(tmp_path))
    uninterrupted, _ = runs.load_run(str(lora_run))
    for key, value in _flat(nnx.state(uninterrupted)).items():
        np.testing.assert_array_equal(_flat(nnx.state(resumed))[key], value, err_msg=str(key))


def test_optimizer_state_scales_with_the_adapters(lora_config):
    sizes = {}
    for name, overrides in {
        "full": {"lora.rank": 0, "lora.quantize": "none", "lora.dropout": 0.0},
        "lora": {"lora.quantize": "none"},
        "qlora": {},
    }.items():
        sizes[name] = lora_cmd.state_bytes(
            config_lib.resolve(config_lib.with_overrides(lora_config, overrides))
        )
    full, lo, q = sizes["full"], sizes["lora"], sizes["qlora"]
    counters = full["optimizer"] - 2 * full["trained"]  # AdamW's step counts
    assert full["trained"] == full["params"] and 0 < counters < 64
    assert lo["optimizer"] == 2 * lo["trained"] + counters and lo["trained"] == q["trained"]
    assert lo["trained"] < full["trained"] / 10
    assert lo["params"] == full["params"] + lo["trained"]
    assert q["params"] < lo["params"]  # int8 codes and a scale per column
    assert lora.trainable(config_lib.resolve(lora_config).lora) is nnx.LoRAParam
