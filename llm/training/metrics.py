"""Where training metrics go: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard,
and with config.tracker="wandb" Weights & Biases (WANDB_MODE=offline: no network needed)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def drop_partial_line(path: pathlib.Path) -> None:
    """Cuts a last line left unfinished by a killed process, so appends start on a fresh line."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
    """Appends metrics to metrics.jsonl (the history survives restarts) and to TensorBoard.

    After a resume the steps since the restored checkpoint are logged again, so a step may have
    several records; the last one is the run's (`last_per_step`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        tracker: str = "",
        config: dict | None = None,
    ):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        drop_partial_line(self.path)
        self._tb = self._wandb = None
        if tensorboard:
            from flax.metrics import tensorboard as flax_tb  # imports TensorFlow: only when asked

            self._tb = flax_tb.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        if tracker == "wandb":
            self._wandb = _start_wandb(pathlib.Path(workdir).resolve(), config or {})

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.scalar(name, float(value), int(step))
            self._tb.flush()
        if self._wandb is not None:  # a step replayed after a resume is dropped by wandb
            self._wandb.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(workdir: pathlib.Path, config: dict):
    """A W&B run named after the workdir, its id fixed by the workdir's path so that a resumed
    run continues it; files under WORKDIR/wandb. WANDB_MODE, WANDB_PROJECT etc. apply."""
    import wandb  # an optional dependency: pip install -e ".[wandb]"

    run_id = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "llm-lab"),
        name=workdir.name,
        id=run_id,
        resume="allow",
        dir=str(workdir),
        config=config,
    )


def read_metrics(workdir: str | os.PathLike, name: str = "metrics.jsonl") -> list[dict]:
    """All complete records of WORKDIR/`name`, in order (a line cut by a kill is left out)."""
    lines = (pathlib.Path(workdir) / name).read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def last_per_step(records: list[dict]) -> dict[int, dict]:
    """step -> its last record: a step replayed after a resume replaces the earlier record."""
    return {r["step"]: r for r in records}
