"""A training run's checkpoints: each step with its size on disk, when it was saved, the losses
logged at that step, and a verify pass that reads back every array of it.

    python -m llm.checkpoints --workdir=/tmp/default
    python -m llm.checkpoints --workdir=/tmp/default --noverify   # list only, reads no arrays

Exit status: 0 if every step verified (or --noverify), 1 if one did not, 2 for a usage mistake.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import sys

from absl import app, flags, logging

from llm import config as config_lib
from llm.training import checkpoint
from llm.training.metrics import last_per_step, read_metrics


@dataclasses.dataclass(frozen=True)
class Step:
    """One checkpoint step of a run."""

    step: int
    size: int  # bytes on disk
    saved: float  # the newest file's modification time, seconds since the epoch
    loss: float | None  # metrics.jsonl's train loss at this step, if logged
    eval_loss: float | None  # ... and eval loss, if evaluated at this step
    problem: str | None  # None: verified (or not checked); else what is wrong, in one line


def list_steps(workdir: str | pathlib.Path, *, verify: bool = True) -> list[Step]:
    """The committed checkpoint steps of `workdir`, oldest first; each read back if `verify`."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file() and not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{workdir} is not a training run (no config.json, no checkpoints/): pass the "
            "--workdir of a `python -m llm.train` run."
        )
    directory = workdir / "checkpoints"
    steps = []
    if directory.is_dir():
        steps = sorted(checkpoint.make_manager(workdir, async_save=False, create=False).all_steps())
    if not steps:
        raise checkpoint.CheckpointNotFoundError(f"no checkpoint in {directory} yet.")
    has_metrics = (workdir / "metrics.jsonl").is_file()
    records = last_per_step(read_metrics(workdir)) if has_metrics else {}
    listed = []
    for step in steps:
        step_dir = directory / str(step)
        files = [p.stat() for p in step_dir.rglob("*") if p.is_file()]
        record = records.get(step, {})
        listed.append(
            Step(
                step=step,
                size=sum(f.st_size for f in files),
                saved=max((f.st_mtime for f in files), default=step_dir.stat().st_mtime),
                loss=record.get("loss"),
                eval_loss=record.get("eval_loss"),
                problem=checkpoint.verify_step(step_dir) if verify else None,
            )
        )
    return listed


def partial_saves(workdir: str | pathlib.Path) -> list[pathlib.Path]:
    """Step directories a killed run left unfinished (deleted when the run resumes)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(p for p in directory.glob("*") if p.is_dir() and not p.name.isdigit())


def format_table(steps: list[Step], verified: bool) -> str:
    """The listing: a row per step, then each problem in full."""
    rows = [("step", "size", "saved", "loss", "eval loss", "check" if verified else "")]
    for s in steps:
        check = ("ok" if s.problem is None else "FAILED") if verified else ""
        rows.append(
            (
                str(s.step),
                f"{s.size / 2**20:.2f} MiB",
                datetime.datetime.fromtimestamp(s.saved).strftime("%Y-%m-%d %H:%M:%S"),
                "-" if s.loss is None else f"{s.loss:.4f}",
                "-" if s.eval_loss is None else f"{s.eval_loss:.4f}",
                check,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"step {s.step}: {s.problem}" for s in steps if s.problem]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        print("error: pass --workdir=DIR, the --workdir of a training run.", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.ERROR)  # orbax warns of each item's missing step metadata
    try:
        steps = list_steps(f.workdir, verify=f.verify)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    total = sum(s.size for s in steps) / 2**20
    print(f"{f.workdir}: {len(steps)} checkpoint step(s), {total:.2f} MiB")
    print(format_table(steps, f.verify))
    for path in partial_saves(f.workdir):
        print(f"{path.name}: a partial save, not committed (deleted when the run resumes)")
    if any(s.problem for s in steps):
        sys.exit(1)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training run directory.")
    flags.DEFINE_bool("verify", True, "Read back every array of every step (--noverify: list).")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
