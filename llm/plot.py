"""Training curves of one or several runs from their WORKDIR/metrics.jsonl: train loss, eval loss,
learning rate and throughput against step, one colour (and legend entry) per run.

    python -m llm.plot --workdir=/tmp/a --workdir=/tmp/b --out=/tmp/curves.png
    python -m llm.plot --workdir=/tmp/a --out=/tmp/curves.pdf /tmp/b /tmp/c   # more runs
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from matplotlib.ticker import MaxNLocator

from llm import config as config_lib
from llm.science import plots
from llm.training.metrics import last_per_step, read_metrics

PANELS = (  # metrics.jsonl field, y-axis label, title
    ("loss", "cross-entropy (nats/token)", "train loss"),
    ("eval_loss", "cross-entropy (nats/token)", "eval loss"),
    ("learning_rate", "learning rate", "learning rate"),
    ("tokens_per_second", "tokens/s (all devices)", "throughput"),
)


def read_run(workdir: str | pathlib.Path) -> list[dict]:
    """The run's metrics records, one per step (the last one after a resume), in step order."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass the --workdir of a `python -m llm.train` run that has "
            "logged at least one step."
        )
    records = last_per_step(read_metrics(workdir))
    if not records:
        raise ValueError(f"{path} has no complete record yet: plot once the run has logged a step.")
    return [records[step] for step in sorted(records)]


def draw(runs: dict[str, list[dict]]):
    """The figure of `runs` (label -> its records): a panel per metric, a line per run."""
    fig, axes = plots.figure(2, 2, size=(9, 6))
    legend = {}  # run -> its line
    for ax, (field, ylabel, title) in zip(axes.flat, PANELS):
        for i, (label, records) in enumerate(runs.items()):
            points = [(r["step"], r[field]) for r in records if field in r]
            if points:
                steps, values = zip(*points)
                style = "o-" if field == "eval_loss" else "-"  # evaluated every eval_every steps
                color = plots.COLORS[i % len(plots.COLORS)]
                (legend[label],) = ax.plot(steps, values, style, color=color, label=label)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {field} logged", transform=ax.transAxes, ha="center")
        ax.set(xlabel="step (optimizer updates)", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=min(len(runs), 4))
    return fig


def plot_runs(workdirs: list[str], out: str | pathlib.Path) -> pathlib.Path:
    """Draws the curves of `workdirs` (labelled as given) into `out` (.png, .pdf, .svg, ...)."""
    if pathlib.Path(out).suffix.lstrip(".") not in plots.FORMATS:
        formats = ", ".join("." + s for s in plots.FORMATS)
        raise ValueError(f"--out={out}: name a file ending in one of {formats}.")
    return plots.save(draw({str(w).rstrip("/"): read_run(w) for w in workdirs}), out)


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    workdirs = (f.workdir or []) + argv[1:]
    if not workdirs or not f.out:
        print(
            "error: pass --workdir=DIR (repeat it, or list more DIRs, for several runs) and "
            "--out=FILE.png.",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        path = plot_runs(workdirs, f.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}: {', '.join(title for _, _, title in PANELS)} of {len(workdirs)} run(s)")


def define_flags() -> None:
    flags.DEFINE_multi_string("workdir", None, "A training run directory; repeat for several.")
    flags.DEFINE_string("out", None, "The figure to write: .png, .pdf, .svg, ...")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
