"""Learning-rate transfer across width, sp against muP: does the best learning rate stay put?

    nice -n 10 python -m experiments.studies.mup_transfer --workdir=/tmp/mup_transfer

Each width (embed_dim; mlp_dim 3x, 4 heads) trains for --steps at each learning rate under sp and
under mup (base width: the smallest), through llm.train.train_and_evaluate; finished runs are not
rerun. Writes results.csv, results.md and lr_transfer.png (final eval loss against log2 learning
rate, a curve per width) to --out. One seed per point. `--replot` redraws the figure from --out's
results.csv.
"""

from __future__ import annotations

import csv
import math
import pathlib
import time

from absl import app, flags, logging

from llm import config as config_lib
from llm import train
from llm.training import metrics

BASE = "experiments/default.py"
COMMON = {  # a 2-layer model: CPU-sized
    "batch_size": 8,
    "seq_len": 64,
    "eval_batches": 4,
    "sample_prompt": "",
    "model.num_layers": 2,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
}
COLUMNS = ("parametrization", "width", "learning_rate", "steps", "eval_loss")


def overrides(parametrization: str, width: int, base_width: int, lr: float, steps: int) -> dict:
    return {
        **COMMON,
        "steps": steps,
        "log_every": steps,
        "eval_every": steps,
        "checkpoint_every": steps,
        "optimizer.learning_rate": lr,
        "optimizer.warmup_steps": max(1, steps // 10),
        "model.embed_dim": width,
        "model.mlp_dim": 3 * width,
        "model.parametrization": parametrization,
        "model.mup_base_width": base_width,
    }


def final_eval_loss(workdir: pathlib.Path) -> float | None:
    """The last eval loss of a finished run in `workdir`, or None."""
    if not (workdir / "metrics.jsonl").exists():
        return None
    evals = [r["eval_loss"] for r in metrics.read_metrics(workdir) if "eval_loss" in r]
    return evals[-1] if evals else None


def plot(rows: list[dict], out: pathlib.Path) -> None:
    """lr_transfer.png: eval loss against log2 learning rate, a panel per parametrization."""
    from llm.science import plots  # matplotlib only when plotting

    parametrizations = sorted({r["parametrization"] for r in rows}, reverse=True)  # sp, mup
    fig, axes = plots.figure(1, len(parametrizations), size=(4.2 * len(parametrizations), 3.4))
    for ax, p in zip(axes, parametrizations, strict=True):
        for width in sorted({int(r["width"]) for r in rows}):
            points = sorted(
                (math.log2(float(r["learning_rate"])), float(r["eval_loss"]))
                for r in rows
                if r["parametrization"] == p and int(r["width"]) == width
            )
            ax.plot(*zip(*points), "o-", label=f"width {width}")
        ax.set(title=p, xlabel="log2 learning rate", ylabel="final eval loss (nats/token)")
        ax.legend()
    plots.save(fig, out / "lr_transfer.png", note="one seed per point")


def write(rows: list[dict], out: pathlib.Path, command: str, seconds: float) -> None:
    """results.csv, results.md (best learning rate per width, the table), lr_transfer.png."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    best = ["| parametrization | width | best learning rate | its eval loss |", "|---|---|---|---|"]
    for p in ("sp", "mup"):
        for width in sorted({r["width"] for r in rows}):
            mine = [r for r in rows if r["parametrization"] == p and r["width"] == width]
            top = min(mine, key=lambda r: r["eval_loss"])
            best.append(f"| {p} | {width} | {top['learning_rate']:g} | {top['eval_loss']} |")
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text(
        "# Learning-rate transfer across width: sp vs muP (one seed)\n\n"
        + "\n".join(best)
        + "\n\n"
        + "\n".join(table)
        + f"\n\nCommand: `{command}`\n\nWall time: {seconds / 60:.1f} min.\n"
    )
    plot(rows, out)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.replot:
        with (pathlib.Path(f.out) / "results.csv").open(newline="") as file:
            plot(list(csv.DictReader(file)), pathlib.Path(f.out))
        return
    if not f.workdir:
        raise app.UsageError("--workdir=DIR is required.")
    logging.set_verbosity(logging.WARNING)
    widths, lrs = sorted(int(w) for w in f.widths), [float(lr) for lr in f.learning_rates]
    workdir, start, rows = pathlib.Path(f.workdir), time.perf_counter(), []
    base = config_lib.load_config(BASE)
    for p in ("sp", "mup"):
        for width in widths:
            for lr in lrs:
                run = workdir / f"{p}_w{width}_lr{lr:g}"
                if final_eval_loss(run) is None:
                    print(f"{run.name}: {f.steps} steps", flush=True)
                    config = config_lib.with_overrides(
                        base, overrides(p, width, widths[0], lr, f.steps)
                    )
                    train.train_and_evaluate(config, str(run))
                loss = round(final_eval_loss(run), 4)
                rows.append(
                    {"parametrization": p, "width": width, "learning_rate": lr}
                    | {"steps": f.steps, "eval_loss": loss}
                )
    command = (
        f"nice -n 10 python -m experiments.studies.mup_transfer --workdir={workdir} "
        f"--out={f.out} --widths={','.join(f.widths)} "
        f"--learning_rates={','.join(f.learning_rates)} --steps={f.steps}"
    )
    write(rows, pathlib.Path(f.out), command, time.perf_counter() - start)
    print((pathlib.Path(f.out) / "results.md").read_text())


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Directory of the study: one workdir per run.")
    flags.DEFINE_string("out", "experiments/results/mup/transfer", "Where the results go.")
    flags.DEFINE_list("widths", ["64", "128", "256"], "embed_dim of each model; smallest = base.")
    flags.DEFINE_list(
        "learning_rates", ["0.001", "0.003", "0.01", "0.03", "0.1"], "Peak learning rates."
    )
    flags.DEFINE_integer("steps", 100, "Optimizer steps per run.")
    flags.DEFINE_bool("replot", False, "Redraw --out's figure from its results.csv; train nothing.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
