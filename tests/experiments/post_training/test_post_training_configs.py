"""The example post-training configs resolve, start from a workdir, and read the shipped data."""

import pathlib

import pytest

from llm import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[3] / "experiments" / "post_training"


@pytest.mark.parametrize("name, fmt", [("sft_full", "sft"), ("dpo", "preference")])
def test_an_example_config_resolves(name, fmt):
    path = CONFIGS / f"{name}.py"
    exp = config_lib.resolve(config_lib.load_config(path))
    assert exp.post_training.format == fmt and exp.init_from.startswith("workdir:")
    assert pathlib.Path(exp.post_training.train_file).is_file()
    assert pathlib.Path(exp.post_training.eval_file).is_file()
    assert f"--config={path.relative_to(CONFIGS.parents[1])}" in path.read_text()
