"""A training step timed on random tokens, built as `llm.train` builds it, from a typed
Experiment (no config file): shared by llm.benchmark and llm.accelerator_report."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from llm.parallel import partitioning
from llm.training import loop
from llm.training.experiment import Experiment


@dataclasses.dataclass
class Timing:
    """Seconds per call of the timed calls."""

    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_calls(fn: Callable[[], object], steps: int, warmup: int) -> Timing:
    """Times `steps` calls of `fn` (which must block until its work is done) after `warmup`."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


def random_batch(exp: Experiment) -> dict[str, np.ndarray]:
    """A fixed batch of random tokens: one document per row, every target counted."""
    shape = (exp.batch_size, exp.seq_len)
    rng = np.random.default_rng(0)
    return {
        "inputs": rng.integers(0, exp.model.vocab_size, shape, dtype=np.int32),
        "targets": rng.integers(0, exp.model.vocab_size, shape, dtype=np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "weights": np.ones(shape, np.float32),
    }


def compile_ours(exp: Experiment, batch: dict) -> tuple[loop.Setup, jax.stages.Compiled, dict]:
    """The state on the experiment's mesh, our train step compiled as `llm.train` compiles it, and
    the batch placed for it."""
    mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
    exp.check_fits(mesh)
    rules = exp.mesh.rules
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        setup = loop.setup_state(exp, mesh)
        batch = jax.device_put(batch, partitioning.batch_sharding(mesh, rules))
        return setup, loop.compile_train_step(exp, setup, batch), batch


def time_ours(
    exp: Experiment, batch: dict, steps: int, warmup: int
) -> tuple[Timing, dict[str, int]]:
    """Our jitted, donated training step timed; and the per-device memory report."""
    setup, train_step, batch = compile_ours(exp, batch)
    memory = partitioning.memory_report(setup.state, train_step)
    state = setup.state

    def step():
        nonlocal state
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics["loss"])

    return time_calls(step, steps, warmup), memory
