"""config.tracker: "wandb" logs every metrics.jsonl record to a W&B run (offline here, no
network); a misspelled tracker, or wandb missing, is a one-line ConfigError before compiling."""

import hashlib
import importlib.util
import json

import pytest

from llm import config as config_lib
from llm import train
from llm.errors import ConfigError
from llm.training import experiment
from llm.training.metrics import read_metrics


def test_wandb_offline_run_holds_the_metrics(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_lib.with_overrides(tiny_config, {"tracker": "wandb", "checkpoint_every": 0})
    train.train_and_evaluate(config, str(tmp_path))

    run_id = hashlib.sha256(str(tmp_path.resolve()).encode()).hexdigest()[:16]
    (log,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = log.read_bytes()  # protobuf records: keys and JSON values are stored as text
    records = read_metrics(tmp_path)
    assert len(records) == 6
    for name in ("loss", "eval_loss", "learning_rate", "tokens_per_second"):
        assert name.encode() in data
    for record in records:
        assert json.dumps(record["loss"]).encode() in data, record
    assert json.dumps(records[-1]["eval_loss"]).encode() in data


def test_tracker_mistakes_are_config_errors(tiny_config, monkeypatch):
    with pytest.raises(ConfigError, match=r"config.tracker must be one of \('', 'wandb'\)"):
        config_lib.resolve(config_lib.with_overrides(tiny_config, {"tracker": "wandbb"}))

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        experiment.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r'needs the wandb package: pip install -e "\.\[wandb\]"'):
        config_lib.resolve(config_lib.with_overrides(tiny_config, {"tracker": "wandb"}))
