"""Runs an IsoFLOP sweep and collects its evaluated checkpoints into one CSV for llm.scaling.

    python -m experiments.studies.sweep --sweep=experiments/scaling/isoflop_small.py --workdir=DIR
    python -m experiments.studies.sweep --sweep=... --workdir=DIR --print_commands  # for a cluster

Runs go sequentially through llm.train.train_and_evaluate into DIR/<run>; a run whose final step
is in its metrics.jsonl is not rerun. With --print_commands, DIR/commands.sh gets one
`python -m llm.train` command per run instead. Either way DIR/runs.csv collects every run's
evaluations so far: params, non_embedding_params, active_params, tokens, flops, loss (eval loss),
and config columns.

A sweep config (experiments/scaling/isoflop_small.py) has: base (a config file), budgets, shapes
(model fields per size), min_steps, evals_per_run, warmup_fraction, learning_rate (the peak),
parametrization (sp | mup) with mup_base_width and mup_base_head_dim, and overrides (dotted config
fields common to every run). Every run is checked before any is trained: a mistake is one line
and exit status 2.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import shlex
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from llm import config as config_lib
from llm import train
from llm.science import flops
from llm.training import metrics

COLUMNS = ("params", "non_embedding_params", "active_params", "tokens", "flops", "loss")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    budget: float
    overrides: dict[str, Any]  # dotted config field -> value, applied to the sweep's base config

    @property
    def steps(self) -> int:
        return self.overrides["steps"]


def common_overrides(sweep: ml_collections.ConfigDict) -> dict[str, Any]:
    """The overrides every run of `sweep` shares: its own, its learning rate and parametrization."""
    mup = {"model.mup_base_width": sweep.mup_base_width}
    mup["model.mup_base_head_dim"] = sweep.mup_base_head_dim
    return {
        **sweep.overrides,
        "optimizer.learning_rate": sweep.learning_rate,
        "model.parametrization": sweep.parametrization,
        **(mup if sweep.parametrization == "mup" else {}),
    }


def plan(sweep: ml_collections.ConfigDict) -> list[Run]:
    """One run per (budget, shape) with at least `min_steps` steps, its steps set by the budget;
    each run's config is resolved (ConfigError on a mistake) before any is trained."""
    common = common_overrides(sweep)
    base = config_lib.with_overrides(config_lib.load_config(sweep.base), common)
    runs = []
    for budget in sweep.budgets:
        for shape in sweep.shapes:
            model = {f"model.{k}": v for k, v in shape.items()}
            cfg = config_lib.model_config(config_lib.with_overrides(base, model))
            steps = flops.steps_for_budget(cfg, budget, base.batch_size, base.seq_len)
            if steps < sweep.min_steps:
                continue
            every = max(1, steps // sweep.evals_per_run)
            schedule = {
                "steps": steps,
                "optimizer.warmup_steps": max(1, round(sweep.warmup_fraction * steps)),
                "log_every": every,
                "eval_every": every,
                "checkpoint_every": steps,
            }
            name = f"c{budget:.0e}_w{shape['embed_dim']}".replace("+", "")
            runs.append(Run(name, budget, {**common, **model, **schedule}))
            config_lib.resolve(config_lib.with_overrides(base, runs[-1].overrides))
    return runs


def command(run: Run, base: str, workdir: pathlib.Path) -> str:
    """The `python -m llm.train` command line of one run."""
    args = [f"--config={base}", f"--workdir={workdir / run.name}"]
    args += [f"--config.{k}={v}" for k, v in run.overrides.items()]
    return " ".join(["python -m llm.train", *map(shlex.quote, args)])


def is_finished(run: Run, workdir: pathlib.Path) -> bool:
    path = workdir / run.name
    return (path / "metrics.jsonl").exists() and any(
        r["step"] == run.steps for r in metrics.read_metrics(path)
    )


def collect(runs: list[Run], base: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[dict]:
    """One row per evaluated checkpoint of each run that has metrics (last record per step)."""
    rows = []
    for run in runs:
        path = workdir / run.name
        if not (path / "metrics.jsonl").exists():
            continue
        config = config_lib.with_overrides(base, run.overrides)
        cfg = config_lib.model_config(config)
        counts = flops.param_counts(cfg)
        per_token = flops.train_flops_per_token(cfg, config.seq_len)
        evals = {r["step"]: r for r in metrics.read_metrics(path) if "eval_loss" in r}
        for step, record in sorted(evals.items()):
            tokens = step * config.batch_size * config.seq_len
            rows.append(
                {
                    "params": counts["total"],
                    "non_embedding_params": counts["non_embedding"],
                    "active_params": counts["active"],  # MoE: router, top_k and shared experts
                    "tokens": tokens,
                    "flops": tokens * per_token,
                    "loss": record["eval_loss"],
                    "train_loss": record["loss"],
                    "budget": run.budget,
                    "run": run.name,
                    "step": step,
                    "final": step == run.steps,
                    **{
                        k.split(".")[-1]: v
                        for k, v in run.overrides.items()
                        if k.startswith("model.")
                    },
                    "learning_rate": config.optimizer.learning_rate,
                    "batch_size": config.batch_size,
                    "seq_len": config.seq_len,
                }
            )
    return rows


def run_sweep(
    sweep: ml_collections.ConfigDict,
    workdir: str,
    train_fn: Callable[[ml_collections.ConfigDict, str], Any] = train.train_and_evaluate,
    print_commands: bool = False,
) -> pathlib.Path:
    """Trains (or writes commands for) the unfinished runs; returns the path of runs.csv."""
    runs = plan(sweep)
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    base = config_lib.load_config(sweep.base)
    if print_commands:
        lines = [command(r, sweep.base, out) for r in runs]
        (out / "commands.sh").write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} commands written to {out / 'commands.sh'}; nothing run", flush=True)
    else:
        for i, run in enumerate(runs):
            if is_finished(run, out):
                print(f"[{i + 1}/{len(runs)}] {run.name}: finished, skipped", flush=True)
                continue
            print(f"[{i + 1}/{len(runs)}] {run.name}: {run.steps} steps", flush=True)
            train_fn(config_lib.with_overrides(base, run.overrides), str(out / run.name))
    rows = collect(runs, base, out)
    path = out / "runs.csv"
    with path.open("w", newline="") as f:
        fieldnames = list(rows[0]) if rows else list(COLUMNS)
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return path


def define_flags() -> None:
    config_flags.DEFINE_config_file("sweep", None, "Sweep config file.", lock_config=True)
    flags.DEFINE_bool("print_commands", False, "Write DIR/commands.sh, run nothing.")
    flags.DEFINE_string("workdir", None, "Directory of the sweep: one workdir per run.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.sweep or not f.workdir:
        raise app.UsageError("--sweep=FILE and --workdir=DIR are required.")
    try:
        plan(f.sweep)  # every run checked before anything is written or trained
    except config_lib.ConfigError as e:
        where = f"a run of --sweep={f['sweep'].config_filename} (its fields: --sweep.*)"
        print(f"error: {where}: {e}", file=sys.stderr)
        sys.exit(2)
    path = run_sweep(f.sweep, f.workdir, print_commands=f.print_commands)
    print(f"runs: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
