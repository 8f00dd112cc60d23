"""Each user mistake ends with one clear message naming the problem and the fix."""

import pathlib
import time

import numpy as np
import pytest

from data import pipeline, text_corpus, tokenizer
from experiments import default
from llm import config as config_lib
from llm import train
from llm.training import loop


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
            {"model.moe.num_experts": 4, "model.scan_layers": True, "model.moe.every": 2},
            config_lib.ConfigError,
            "scan_layers=True stacks identical layers, so every layer must be MoE",
        ),
        (
            {"model.attention_pattern": "sliding,sparse"},
            config_lib.ConfigError,
            "unknown attention pattern 'sparse'",
        ),
        (
            {"model.attention_pattern": "sliding*2,dense"},
            config_lib.ConfigError,
            "has 3 entries, which does not divide config.model.num_layers=2",
        ),
        (
            {"model.attention_pattern": "sliding", "model.attention_window": 64},
            config_lib.ConfigError,
            "attention_window=64 does not fit in config.seq_len=32",
        ),
        (
            {"model.attention_pattern": "nsa", "model.attention_nsa_block": 0},
            config_lib.ConfigError,
            "config.model.attention_nsa_block must be an integer >= 1, got 0",
        ),
        (
            {"model.attention_pattern": "chunked", "model.attention_chunk": 33},
            config_lib.ConfigError,
            "attention_chunk=33 does not fit in config.seq_len=32",
        ),
        (
            {"model.attention_pattern": "sliding,dense", "model.scan_layers": True},
            config_lib.ConfigError,
            "scan_layers=False or use a single pattern",
        ),
    ],
)
def test_config_and_data_mistakes(tmp_path, tiny_config, fields, error, message):
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config_lib.with_overrides(tiny_config, fields), str(tmp_path))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "config.steps must be a positive integer, got 0"),
        ({"batch_size": -8}, "config.batch_size must be a positive integer"),
        ({"seq_len": 0}, "config.seq_len must be a positive integer"),
        ({"log_every": 0}, "config.log_every must be a positive integer"),
        ({"keep_checkpoints": 0}, "config.keep_checkpoints must be a positive integer"),
        ({"eval_every": -1}, "config.eval_every must be >= 0"),
        ({"checkpoint_every": -5}, "config.checkpoint_every must be >= 0"),
        ({"grad_accum_steps": 3}, "not divisible by config.grad_accum_steps=3"),
        ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate must be > 0"),
        ({"optimizer.warmup_steps": 6}, r"warmup_steps=6 must be in \[0, steps=6\)"),
        ({"optimizer.min_learning_rate_ratio": 1.5}, "min_learning_rate_ratio must be in"),
        ({"optimizer.grad_clip_norm": -1.0}, "grad_clip_norm must be >= 0"),
        ({"z_loss": -1e-4}, "config.z_loss must be >= 0"),
        ({"loss.impl": "fused"}, "config.loss.impl must be one of"),
        ({"loss.vocab_chunk": 0}, "config.loss.vocab_chunk must be a positive integer"),
        ({"loss.seq_block": -4}, "config.loss.seq_block must be a positive integer"),
        ({"nonfinite": "ignore"}, "config.nonfinite='ignore' is not one of"),
        ({"profile.start_step": -2}, "config.profile.start_step must be a step >= 0, or -1"),
        ({"profile.steps": 0}, "config.profile.steps must be a positive integer"),
        ({"loss_spike.window": -1}, "config.loss_spike.window must be an integer >= 0"),
        ({"loss_spike.sigmas": 0.0}, "config.loss_spike.sigmas must be > 0"),
        ({"model.dtype": "float64"}, "config.model.dtype='float64' is not one of"),
        ({"model.dtype": "float16"}, "config.model.dtype=float16 needs loss scaling"),
        ({"model.param_dtype": "bfloat16"}, "training keeps float32 parameters"),
        ({"seed": -1}, "config.seed must be an integer >= 0, got -1"),
        (
            {"loss.impl": "chunked", "model.final_logit_softcap": 30.0},
            "does not apply model.final_logit_softcap",
        ),
        ({"model.vocab_size": 50_000_000}, "needs at least .* GiB .* more than this host's"),
        ({"resume_policy": "yolo"}, "config.resume_policy must be one of"),
        ({"resume_schedule": "rewind"}, "config.resume_schedule must be one of"),
        ({"model.param_dtype": "int8"}, "config.model.param_dtype='int8' is not one of"),
        ({"model.attention_impl": "flash"}, "config.model.attention_impl='flash' is not one of"),
        ({"model.rope_theta": 0.0}, "config.model.rope_theta must be > 0"),
        ({"model.rope_scaling.type": "ntk"}, "config.model.rope_scaling.type='ntk' is not one"),
        (
            {"model.rope_scaling.type": "linear", "model.rope_scaling.factor": 0.5},
            "config.model.rope_scaling.factor must be >= 1",
        ),
        (
            {"model.rope_scaling.type": "yarn", "model.rope_scaling.beta_slow": 64.0},
            "needs beta_fast > beta_slow > 0 for yarn",
        ),
        ({"model.embed_dim": 60}, "head_dim=15 must be even"),
        ({"model.num_layers": 0}, "config.model.num_layers must be a positive integer"),
        ({"mesh.data": 0}, "config.mesh.data must be a positive integer or -1"),
        ({"mesh.sequence": 0}, "config.mesh.sequence must be a positive integer or -1"),
    ],
)
def test_invalid_config_fails_in_under_a_second_before_compiling(
    tmp_path, tiny_config, monkeypatch, fields, message
):
    monkeypatch.setattr(loop, "compile_train_step", None)  # reaching it would be a TypeError
    config = config_lib.with_overrides(tiny_config, fields)
    start = time.perf_counter()
    with pytest.raises(config_lib.ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "run").exists(), "validated before the workdir is touched"


def test_corrupt_packed_cache_is_rebuilt(tiny_config):
    kwargs = {
        "name": "text_corpus",
        "builder_kwargs": {"config": text_corpus.config_for_directory(tiny_config.data.text_dir)},
        "split": "validation",
        "seq_len": 32,
        "tokenizer": tokenizer.Tokenizer(),
        "data_dir": tiny_config.data.data_dir,
        "seed": 0,
    }
    expected = pipeline.load_dataset(**kwargs).arrays["inputs"]
    cache = next((pathlib.Path(tiny_config.data.data_dir) / "packed").glob("*validation_L32_*"))
    cache.write_bytes(cache.read_bytes()[:100])  # a cache cut short by a kill or a full disk
    np.testing.assert_array_equal(pipeline.load_dataset(**kwargs).arrays["inputs"], expected)


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


ROOT = pathlib.Path(__file__).parents[2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.model.num_layer=2"], 'Did you mean "num_layers"'),
        (  # a misspelled field of a config file named on the command line
            [f"--config={ROOT / 'experiments/default.py'}", "--config.model.num_layrs=2"],
            'Did you mean "num_layers"',
        ),
        (["--config.model.num_heads=5"], "not divisible by config.model.num_kv_heads"),
        (["--config.steps=ten"], "--config.steps=ten: invalid literal for int()"),
        (["--config=experiments/nope.py"], "the --config file could not be loaded"),
        (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    ],
)
def test_command_line_mistakes_exit_with_a_message_not_a_traceback(
    run_module, tmp_path, flags, message
):
    """One `error:` line and exit status 2; run from outside the repository, so the default
    config is found from the package, not the working directory."""
    result = run_module("llm.train", f"--workdir={tmp_path / 'run'}", *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_scaling_with_a_missing_csv_exits_with_a_message(run_module, tmp_path):
    result = run_module("llm.scaling", f"--runs={tmp_path / 'missing.csv'}")
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: --runs={tmp_path / 'missing.csv'}: [Errno 2] No such file or directory: '{tmp_path / 'missing.csv'}'\n"
    )


def test_a_short_run_needs_only_its_steps():
    """warmup_steps unset follows the run's length: the default keeps its 30 of 300 steps."""
    assert config_lib.resolve(default.get_config()).optimizer.warmup_steps == 30
    short = config_lib.with_overrides(default.get_config(), {"steps": 20})
    assert config_lib.resolve(short).optimizer.warmup_steps == 2
    explicit = config_lib.with_overrides(short, {"optimizer.warmup_steps": 20})
    with pytest.raises(config_lib.ConfigError, match=r"warmup_steps=20 must be in \[0, steps=20\)"):
        config_lib.resolve(explicit)


def test_help_lists_the_config_fields_with_defaults_and_comments(run_module, tmp_path):
    result = run_module("llm.train", "--help", cwd=tmp_path)
    text = " ".join(result.stdout.split())  # absl wraps the help text (and exits 1 after it)
    assert "model.num_layers = 4 # transformer blocks" in text
    assert "model.moe.top_k = 2 # experts per token" in text
    assert "optimizer.warmup_steps = None # None = steps // 10" in text
