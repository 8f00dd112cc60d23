"""Each user mistake ends with one clear message naming the problem and the fix."""

import subprocess
import sys

import pytest

from data import pipeline, tokenizer, text_corpus
from llm import config as config_lib, train


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (
            {"model.num_kv_heads": 3},
            config_lib.ConfigError,
            "not divisible by config.model.num_kv",
        ),
        ({"seq_len": 4096}, config_lib.ConfigError, "longer than the model accepts"),
        ({"model.vocab_size": 1000}, config_lib.ConfigError, "smaller than the tokenizer"),
        ({"model.remat": "some"}, config_lib.ConfigError, "config.model.remat"),
        ({"batch_size": 12}, config_lib.ConfigError, "use a multiple of 8"),
        (
            {"data.text_dir": "/nonexistent/corpus"},
            text_corpus.CorpusNotFoundError,
            "/nonexistent",
        ),
        (
            {"data.tokenizer": "/nonexistent/sp.model"},
            tokenizer.TokenizerNotFoundError,
            "data.tokenizer",
        ),
        ({"data.dataset": "no_such_corpus"}, pipeline.DataError, "no tfds dataset named"),
        ({"seq_len": 2000, "model.max_seq_len": 4096}, pipeline.DataError, "fewer than one batch"),
        (
            {"model.moe.num_experts": 4, "model.moe.top_k": 5},
            config_lib.ConfigError,
            "config.model.moe.top_k=5 is more than config.model.moe.num_experts=4",
        ),
        (
            {"model.moe.num_experts": 6, "mesh.data": 2, "mesh.expert": 4},
            config_lib.ConfigError,
            "config.model.moe.num_experts=6 does not split over mesh.expert=4",
        ),
        (
            {"model.moe.num_experts": 4, "model.moe.capacity_factor": 0.0},
            config_lib.ConfigError,
            "config.model.moe.capacity_factor must be > 0",
        ),
        (
            {"model.moe.num_experts": 4, "model.moe.router": "topk"},
            config_lib.ConfigError,
            "config.model.moe.router='topk' is not one of",
        ),
        (
            {"model.moe.num_experts": 4, "model.moe.dispatch": "dropful"},
            config_lib.ConfigError,
            "config.model.moe.dispatch='dropful' is not one of",
        ),
        (
            {"model.moe.num_experts": 4, "model.moe.shared_expert_gate": True},
            config_lib.ConfigError,
            "config.model.moe.shared_expert_gate=True gates the shared experts",
        ),
        (
            {"model.moe.num_experts": 4, "model.scan_layers": True},
            config_lib.ConfigError,
            "scan_layers=True is not supported with MoE",
        ),
    ],
)
def test_config_and_data_mistakes(tmp_path, tiny_config, fields, error, message):
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config_lib.with_overrides(tiny_config, fields), str(tmp_path))


def test_corrupt_tokenizer_file(tmp_path, tiny_config):
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a sentencepiece model")
    with pytest.raises(tokenizer.TokenizerLoadError, match="corrupt.model"):
        train.train_and_evaluate(
            config_lib.with_overrides(tiny_config, {"data.tokenizer": str(corrupt)}),
            str(tmp_path / "w"),
        )


def test_unwritable_workdir(tmp_path, tiny_config):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        train.train_and_evaluate(tiny_config, str(blocker / "workdir"))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model.num_layer=2", 'Did you mean "num_layers"'),
        ("--config.model.num_heads=5", "not divisible by config.model.num_kv_heads"),
    ],
)
def test_command_line_mistakes_exit_with_a_message_not_a_traceback(tmp_path, flag, message):
    result = subprocess.run(
        [sys.executable, "-m", "llm.train", f"--workdir={tmp_path}", flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
