"""Peak host memory of a checkpoint save and restore, beside the size of the train state; and of
`llm.hf.load` of a Hugging Face directory, beside the size of its weights.

    python -m llm.checkpoint_memory --config=experiments/default.py [--config.model.num_layers=8]
    python -m llm.checkpoint_memory --hf=path/to/hf_model [--hf_dtype=bfloat16]

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
from flax import nnx

from llm import config as config_lib
from llm import hf
from llm.parallel import partitioning
from llm.training import checkpoint, loop
from llm.training.experiment import Experiment


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_anon() -> int:
    """The anonymous part of the resident set (heap, arrays) in bytes: without the page cache of
    memory-mapped files, which the kernel can reclaim."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status")


@contextlib.contextmanager
def peak_rss(result: dict, key: str, interval: float = 0.001, measure=rss):
    """Records in result[key] the peak of `measure` (RSS) above its value at entry, sampled every
    `interval` s."""
    gc.collect()
    start, peak, done = measure(), [0], threading.Event()

    def sample():
        while not done.wait(interval):
            peak[0] = max(peak[0], measure())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result[key] = max(peak[0], measure()) - start


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


def measure_hf_load(path: str, dtype: str) -> dict[str, int]:
    """Bytes: the loaded weights, and the peak RSS increase while `hf.load` reads them."""
    result: dict[str, int] = {}
    with peak_rss(result, "hf.load"), peak_rss(result, "hf.load, anonymous", measure=rss_anon):
        model = hf.load(path, dtype=dtype)
        state = jax.block_until_ready(nnx.state(model))
    result["state"] = sum(x.nbytes for x in jax.tree.leaves(state))
    return result


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of its work at INFO
    f = flags.FLAGS
    if f.hf:
        result = measure_hf_load(f.hf, f.hf_dtype)
        state = result.pop("state")
        print(f"weights: {state / 2**20:.1f} MiB ({f.hf_dtype})")
        for name, grown in result.items():
            print(f"{name}: peak host RSS +{grown / 2**20:.1f} MiB = {grown / state:.2f} x weights")
        return
    result = measure(config_lib.resolve(f.config))
    state = result.pop("state")
    print(f"train state: {state / 2**20:.1f} MiB ({jax.device_count()} device(s))")
    for name, grown in result.items():
        print(f"{name:>10}: peak host RSS +{grown / 2**20:7.1f} MiB = {grown / state:.2f} x state")


if __name__ == "__main__":
    config_lib.define_config_flag()
    flags.DEFINE_string("hf", None, "Measure llm.hf.load of this Hugging Face directory instead.")
    flags.DEFINE_string("hf_dtype", "float32", "The dtype hf.load casts the weights to.")
    app.run(main, flags_parser=config_lib.parse_flags)
