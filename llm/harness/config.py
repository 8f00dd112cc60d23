"""config.eval: lm-evaluation-harness tasks run during training (`llm.harness.run`), checked here.

A leaf module (no lm_eval import), so the typed experiment can hold it without the extra.
"""

from __future__ import annotations

import dataclasses
import pathlib

from llm.errors import check, check_positive, is_int

# The tasks shipped with the repo (task YAML over local JSONL; `python -m llm.harness.build_tasks`).
TASKS_DIR = pathlib.Path(__file__).resolve().parent / "tasks"


def split_tasks(tasks: str) -> tuple[str, ...]:
    """ "a, b,c" -> ("a", "b", "c")."""
    return tuple(t.strip() for t in tasks.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
    """config.eval: lm-eval tasks scored every eval_every steps (metrics.jsonl and TensorBoard as
    harness/TASK/METRIC)."""

    harness_tasks: str = ""  # comma-separated lm-eval task names; "" disables
    harness_limit: int = 0  # documents per task; 0 = all
    harness_include_path: str = ""  # another directory of task YAML
    harness_batch_size: int = 16  # rows per scoring batch (rounded up to the batch devices)
    harness_max_length: int = 0  # longest scored window in tokens; 0 = the run's seq_len

    def __post_init__(self):
        check(
            isinstance(self.harness_tasks, str),
            f"config.eval.harness_tasks must be a comma-separated string of task names, got "
            f"{self.harness_tasks!r}.",
        )
        check(
            is_int(self.harness_limit) and self.harness_limit >= 0,
            f"config.eval.harness_limit must be an integer >= 0 (0: every document), got "
            f"{self.harness_limit!r}.",
        )
        check_positive(self.harness_batch_size, "eval.harness_batch_size")
        check(
            is_int(self.harness_max_length) and self.harness_max_length >= 0,
            f"config.eval.harness_max_length must be an integer >= 0 (0: the run's seq_len), got "
            f"{self.harness_max_length!r}.",
        )
        check(
            not self.harness_include_path or pathlib.Path(self.harness_include_path).is_dir(),
            f"config.eval.harness_include_path={self.harness_include_path!r} is not a directory: "
            'pass a directory of lm-eval task YAML files, or "".',
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        return split_tasks(self.harness_tasks)
