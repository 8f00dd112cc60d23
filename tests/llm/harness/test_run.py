"""llm.harness.run: config.eval's tasks scored during training (metrics.jsonl), flat scores,
and the mistakes refused in one line: unknown task names, bad config.eval values."""

import pytest

from llm import config as config_lib
from llm import train
from llm.errors import ConfigError
from llm.harness import run
from llm.training.metrics import last_per_step, read_metrics


def test_training_logs_the_tasks_scores_at_each_evaluation(tiny_config, tmp_path):
    config = config_lib.with_overrides(
        tiny_config,
        {"steps": 3, "eval.harness_tasks": "llm_lab_cloze", "eval.harness_limit": 4},
    )
    train.train_and_evaluate(config, str(tmp_path))
    records = last_per_step(read_metrics(tmp_path))
    assert 0 <= records[3]["harness/llm_lab_cloze/acc"] <= 1
    assert "harness/llm_lab_cloze/acc_norm" in records[3]
    assert not any(k.startswith("harness/") for k in records[1])  # only when evaluating


def test_scores_are_flat_numbers_without_standard_errors():
    results = {
        "results": {
            "t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "em,first": 1.0},
        },
        "groups": {"g": {"alias": "g", "em,first": 0.25}},
    }
    assert run.scores(results) == {
        "harness/t/acc": 0.5,
        "harness/t/em/first": 1.0,
        "harness/g/em/first": 0.25,
    }


def test_an_unknown_task_is_one_line_naming_where_tasks_are():
    with pytest.raises(run.UnknownTaskError) as error:
        run.task_manager(["llm_lab_clozee"])
    message = str(error.value)
    assert "llm_lab_clozee" in message and "lm-eval ls tasks" in message
    assert "llm_lab_cloze" in message and "\n" not in message  # the shipped names


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("eval.harness_limit", -1, "harness_limit must be an integer >= 0"),
        ("eval.harness_batch_size", 0, "harness_batch_size must be a positive integer"),
        ("eval.harness_include_path", "/no/such/dir", "is not a directory"),
        ("eval.harness_max_length", -2, "harness_max_length must be an integer >= 0"),
    ],
)
def test_bad_eval_settings_are_config_errors(tiny_config, field, value, words):
    with pytest.raises(ConfigError, match=words):
        config_lib.resolve(config_lib.with_overrides(tiny_config, {field: value}))
