"""MoE against dense at equal training FLOPs, counted with active parameters (llm.science.flops).

    nice -n 10 python -m experiments.studies.moe_vs_dense --workdir=/tmp/moe_vs_dense

At each compute budget a dense model and an MoE model of the same active parameters (8 experts,
top-2, each expert half the dense MLP width, so a token's two experts cost one dense MLP) train
for budget / (FLOPs per token x tokens per step) steps on the shipped corpus, through
llm.train.train_and_evaluate; finished runs are not rerun. Writes results.csv, results.md and
loss_vs_flops.png to --out. About 12 minutes on a busy 2-core CPU. `--replot` redraws the figure
from --out's results.csv.
"""

from __future__ import annotations

import csv
import pathlib
import statistics
import time

from absl import app, flags, logging

from experiments.studies import sweep
from llm import config as config_lib
from llm import train
from llm.science import flops
from llm.training import metrics

BASE = "experiments/default.py"
COMMON = {  # a 2-layer, 64-wide model: CPU-sized
    "batch_size": 8,
    "seq_len": 128,
    "eval_batches": 8,
    "sample_prompt": "",
    "model.num_layers": 2,
    "model.embed_dim": 64,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.mlp_dim": 192,
}
LABELS = {"dense": "dense", "moe_8x2": "MoE: 8 experts, top-2"}  # run name -> legend
MODELS = {
    "dense": {},
    "moe_8x2": {
        "model.moe.num_experts": 8,
        "model.moe.top_k": 2,
        "model.moe.expert_mlp_dim": 96,  # top_k * 96 = the dense mlp_dim
    },
}
COLUMNS = (
    "budget", "model", "active_params", "total_params", "steps", "tokens", "flops",
    "eval_loss", "tokens_per_second",
)  # fmt: skip


def plan(budgets: list[float]) -> list[sweep.Run]:
    """One run per (budget, model), its steps set by the budget."""
    base = config_lib.with_overrides(config_lib.load_config(BASE), COMMON)
    runs = []
    for budget in budgets:
        for name, fields in MODELS.items():
            cfg = config_lib.model_config(config_lib.with_overrides(base, fields))
            steps = flops.steps_for_budget(cfg, budget, base.batch_size, base.seq_len)
            schedule = {
                "steps": steps,
                "optimizer.warmup_steps": max(1, steps // 10),
                "log_every": max(1, steps // 10),
                "eval_every": steps,
                "checkpoint_every": steps,
            }
            runs.append(
                sweep.Run(f"{name}_c{budget:.1e}", budget, {**COMMON, **fields, **schedule})
            )
    return runs


def result(run: sweep.Run, model: str, workdir: pathlib.Path) -> dict:
    """The table row of a finished run."""
    config = config_lib.with_overrides(config_lib.load_config(BASE), run.overrides)
    cfg = config_lib.model_config(config)
    counts = flops.param_counts(cfg)
    records = metrics.read_metrics(workdir / run.name)
    tokens = run.steps * config.batch_size * config.seq_len
    return {
        "budget": f"{run.budget:.2g}",
        "model": model,
        "active_params": counts["active"],
        "total_params": counts["total"],
        "steps": run.steps,
        "tokens": tokens,
        "flops": f"{tokens * flops.train_flops_per_token(cfg, config.seq_len):.3g}",
        "eval_loss": round([r for r in records if "eval_loss" in r][-1]["eval_loss"], 4),
        "tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in records)),
    }


def write(rows: list[dict], out: pathlib.Path, command: str, seconds: float) -> None:
    """results.csv, results.md (the table, the command and its wall time), loss_vs_flops.png."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text(
        "# MoE (8 experts, top-2) vs dense at equal active-parameter training FLOPs\n\n"
        + "\n".join(lines)
        + f"\n\nCommand: `{command}`\n\nWall time: {seconds / 60:.1f} min "
        "(steps of runs already finished are not rerun or counted).\n"
    )
    plot(rows, out)


def plot(rows: list[dict], out: pathlib.Path) -> None:
    """loss_vs_flops.png from the table's rows (as written, or read back from results.csv)."""
    from matplotlib.ticker import NullLocator  # matplotlib only when plotting

    from llm.science import plots

    fig, ax = plots.figure(size=(5, 3.5))
    for model, label in LABELS.items():
        mine = sorted(
            (float(r["flops"]), float(r["eval_loss"])) for r in rows if r["model"] == model
        )
        ax.plot(*zip(*mine), "o-", label=label)
    budgets = sorted({float(r["budget"]) for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(budgets, [plots.power_of_ten(b) for b in budgets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="training FLOPs (active parameters)", ylabel="final eval loss (nats/token)")
    ax.legend()
    plots.save(fig, out / "loss_vs_flops.png", note="one seed per point")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Directory of the study: one workdir per run.")
    flags.DEFINE_string("out", "experiments/results/moe_vs_dense", "Where the results go.")
    flags.DEFINE_list("budgets", ["5e11", "1e12", "2e12", "4e12"], "Training FLOPs per run.")
    flags.DEFINE_bool("replot", False, "Redraw --out's figure from its results.csv; train nothing.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if flags.FLAGS.replot:
        out = pathlib.Path(flags.FLAGS.out)
        with (out / "results.csv").open(newline="") as f:
            plot(list(csv.DictReader(f)), out)
        return
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir=DIR is required.")
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    workdir, start = pathlib.Path(flags.FLAGS.workdir), time.perf_counter()
    runs = plan([float(b) for b in flags.FLAGS.budgets])
    base = config_lib.load_config(BASE)
    rows = []
    for i, run in enumerate(runs):
        model = run.name.rsplit("_c", 1)[0]
        if not sweep.is_finished(run, workdir):
            print(f"[{i + 1}/{len(runs)}] {run.name}: {run.steps} steps", flush=True)
            train.train_and_evaluate(
                config_lib.with_overrides(base, run.overrides), str(workdir / run.name)
            )
        rows.append(result(run, model, workdir))
    command = (
        f"nice -n 10 python -m experiments.studies.moe_vs_dense --workdir={workdir} "
        f"--out={flags.FLAGS.out} --budgets={','.join(flags.FLAGS.budgets)}"
    )
    write(rows, pathlib.Path(flags.FLAGS.out), command, time.perf_counter() - start)
    print((pathlib.Path(flags.FLAGS.out) / "results.md").read_text())


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
