"""What a training run measures besides its loss: throughput and MFU, memory per device, and a
profiler trace of chosen steps."""

from __future__ import annotations

import pathlib
import statistics
import time

import jax

from llm.science import flops
from llm.training.experiment import Experiment
from llm.training.state import TrainState


def format_memory(report: dict[str, int]) -> str:
    """One line: per-device MiB of each entry of `partitioning.memory_report`."""
    return "memory per device: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in report.items())


class Profile:
    """A jax.profiler trace of steps [start, start + steps) into WORKDIR/profile/ (TensorBoard's
    profile plugin or Perfetto read it); start < 0: none."""

    def __init__(self, directory: pathlib.Path, start: int, steps: int):
        self.directory, self.start, self.end, self.tracing = directory, start, start + steps, False

    def before(self, step: int) -> None:
        if step == self.start:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, done: int, state: TrainState) -> None:
        if self.tracing and done == self.end:
            self.stop(state)

    def stop(self, state: TrainState) -> None:
        """Ends the trace once the traced steps' work is done (at the end of the run too)."""
        if self.tracing:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False


class Throughput:
    """Tokens/s (since the last `measure`, and the median of all measures), TFLOP/s per device,
    MFU, and the clock: `wall_time` (seconds since the epoch) and `elapsed` (seconds since this
    process started training)."""

    def __init__(self, exp: Experiment, flops_per_token: float, teacher_flops: float = 0.0):
        self.flops_per_token, self.teacher_flops = flops_per_token, teacher_flops  # per token
        self.peak = flops.peak_flops(jax.devices()[0])
        self.tokens_per_step = exp.tokens_per_step
        self.start = self.tick = time.perf_counter()
        self.steps, self.history = 0, []

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        tokens_per_second = self.steps * self.tokens_per_step / (now - self.tick)
        self.history.append(tokens_per_second)
        achieved = tokens_per_second * self.flops_per_token / jax.device_count()
        out = {
            "tokens_per_second": tokens_per_second,
            "tokens_per_second_median": statistics.median(self.history),
            "tflops_per_device": achieved / 1e12,
            "wall_time": time.time(),
            "elapsed": now - self.start,
        }
        if self.peak:
            out["mfu"] = achieved / self.peak  # the student's: the teacher's forward is apart
        if self.teacher_flops:
            out["teacher_tflops_per_device"] = (
                achieved / self.flops_per_token * self.teacher_flops / 1e12
            )
        self.tick, self.steps = time.perf_counter(), 0
        return out
