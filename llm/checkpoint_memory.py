"""Peak host memory of a checkpoint save and restore, beside the size of the train state.

    python -m llm.checkpoint_memory --config=experiments/default.py [--config.model.num_layers=8]

Restore reads into abstract targets (shapes, dtypes, shardings from jax.eval_shape): no fresh
state is built first, so its peak should stay near one state, not two. A fresh init is measured
alongside as the baseline. Linux only (reads /proc/self/statm).
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import threading

import jax
from absl import app, flags, logging

from llm import config as config_lib
from llm.parallel import partitioning
from llm.training import checkpoint, loop
from llm.training.experiment import Experiment


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_rss(result: dict, key: str, interval: float = 0.001):
    """Records in result[key] the peak RSS above the RSS at entry, sampled every `interval` s."""
    gc.collect()
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(interval):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result[key] = max(peak[0], rss()) - start


def measure(exp: Experiment) -> dict[str, int]:
    """Bytes: the state, and the peak RSS increase of a fresh init, a save, a restore."""
    mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
    result: dict[str, int] = {}
    with (
        tempfile.TemporaryDirectory() as workdir,
        jax.set_mesh(mesh),
        partitioning.axis_rules(exp.mesh.rules),
    ):
        with peak_rss(result, "fresh init"):
            state = loop.setup_state(exp, mesh).state
            jax.block_until_ready(state)
        result["state"] = sum(x.nbytes for x in jax.tree.leaves(state))
        manager = checkpoint.make_manager(workdir)
        with peak_rss(result, "save"):
            checkpoint.save(manager, state)
            checkpoint.wait(manager)
        del state
        manager = checkpoint.make_manager(workdir)
        with peak_rss(result, "restore"):
            state = loop.setup_state(exp, mesh, manager).state
            jax.block_until_ready(state)
    return result


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of its work at INFO
    result = measure(config_lib.resolve(flags.FLAGS.config))
    state = result.pop("state")
    print(f"train state: {state / 2**20:.1f} MiB ({jax.device_count()} device(s))")
    for name, grown in result.items():
        print(f"{name:>10}: peak host RSS +{grown / 2**20:7.1f} MiB = {grown / state:.2f} x state")


if __name__ == "__main__":
    config_lib.define_config_flag()
    app.run(main, flags_parser=config_lib.parse_flags)
