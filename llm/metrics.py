"""Where training metrics go: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard."""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class MetricsWriter:
    """Appends metrics to metrics.jsonl (the history survives restarts) and to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from flax.metrics import tensorboard as flax_tb  # imports TensorFlow: only when asked

            self._tb = flax_tb.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.scalar(name, float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of WORKDIR/metrics.jsonl, in order."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
