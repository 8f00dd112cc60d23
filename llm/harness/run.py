"""lm-eval tasks on our models: the task index (the shipped tasks of llm/harness/tasks, an
--include_path, lm-eval's public tasks by name), lm-eval's results, a short table, and the flat
scores the trainer logs every eval_every steps (`trainer_evaluator`).

lm_eval is imported only when tasks are run, so training without config.eval.harness_tasks does
not need the `eval` extra.
"""

from __future__ import annotations

import logging
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from llm.errors import ConfigError
from llm.harness.config import TASKS_DIR, HarnessConfig
from llm.parallel import partitioning


class UnknownTaskError(ConfigError):
    """A task name neither the shipped tasks, an --include_path nor lm-eval's index has."""


def local_tasks() -> list[str]:
    """The names of the shipped tasks and groups (their YAML files' `task:` or `group:`)."""
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        for line in path.read_text().splitlines():
            name = line.split(":", 1)[1].strip() if line.startswith(("task:", "group:")) else ""
            if name:
                names.append(name)
    return names


def task_manager(tasks: Sequence[str], include_path: str = ""):
    """An lm_eval TaskManager that knows every name in `tasks`: the shipped tasks and
    `include_path` alone when they suffice, else lm-eval's own index too (~10 s to build)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)  # a warning per custom_dataset
    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(_known(t, manager) for t in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if not _known(t, manager)]
    if unknown:
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {unknown}: the shipped tasks are {local_tasks()}; "
            "`lm-eval ls tasks` lists lm-eval's own (hellaswag, arc_easy, ...: data from the "
            "Hugging Face hub), and --include_path=DIR adds a directory of task YAML."
        )
    return manager


def _known(task: str, manager) -> bool:
    return task in manager.all_tasks or (task.endswith(".yaml") and pathlib.Path(task).is_file())


def evaluate(
    lm: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    include_path: str = "",
    manager: Any = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> dict:
    """lm-eval's results of `tasks` on `lm` (a JaxLM), at most `limit` documents each."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit or None,
        task_manager=manager or task_manager(tasks, include_path),
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
    )


def scores(results: dict) -> dict[str, float]:
    """{"harness/TASK/METRIC": value} of each numeric score (standard errors left out; a metric
    computed after a filter other than "none" is METRIC/FILTER)."""
    out = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                metric, _, kind = key.partition(",")
                if "stderr" in metric or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    name = metric if kind in ("", "none") else f"{metric}/{kind}"
                    out[f"harness/{task}/{name}"] = float(value)
    return out


def format_table(results: dict) -> str:
    """lm-eval's own tables: one row per task and metric (and per group, if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def trainer_evaluator(
    cfg: HarnessConfig,
    graphdef: nnx.GraphDef,
    tokenizer: Any,
    mesh: jax.sharding.Mesh,
    rules: partitioning.AxisRules,
    seq_len: int,
) -> Callable[[nnx.State], dict[str, float]]:
    """params -> the scores of config.eval's tasks ({} without tasks). Unknown task names are
    refused here, before training compiles."""
    if not cfg.tasks:
        return lambda params: {}
    from llm.harness.lm import JaxLM

    manager = task_manager(cfg.tasks, cfg.harness_include_path)

    def run(params: nnx.State) -> dict[str, float]:
        lm = JaxLM(
            nnx.merge(graphdef, params),
            tokenizer,
            mesh=mesh,
            rules=rules,
            max_length=cfg.harness_max_length or seq_len,
            batch_size=cfg.harness_batch_size,
        )
        results = evaluate(
            lm, cfg.tasks, limit=cfg.harness_limit, manager=manager, bootstrap_iters=0
        )
        return {k: v for k, v in scores(results).items() if math.isfinite(v)}

    return run
