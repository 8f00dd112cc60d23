"""Run a teacher once over a run's training batches and keep its top-k logits, for
`config.distill.cache` (offline distillation: the student's steps then skip the teacher).

  python -m llm.distill_cache --config=experiments/default.py \
    --config.distill.teacher=workdir:/tmp/teacher --top_k=32 --out=/tmp/topk
  python -m llm.train --config=experiments/default.py --workdir=/tmp/student \
    --config.distill.cache=/tmp/topk

The batches are those of the given config (a batch is a pure function of seed and step), steps
[0, config.steps); the student's run must have the same seed, batch, sequence length, data and
vocabulary (checked from OUT/manifest.json). Files: float32 logits and int32 ids, each
[steps, batch, seq_len, top_k], and the float32 logsumexp of all logits / T [steps, batch, seq_len]. Prints the teacher's mean probability mass inside its top k at
distill.temperature (the cache is for that T): the rest is one "tail" outcome (distill.top_k_kl).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from llm import config as config_lib
from llm.errors import ConfigError, check
from llm.parallel import partitioning
from llm.training import distill
from llm.training.experiment import Experiment


def top_k_fn(teacher_graphdef: nnx.GraphDef, k: int, temperature: float):
    """(teacher state, batch) -> top-k logits f32[B, L, k], ids int32[B, L, k], logsumexp of
    all logits / `temperature` f32[B, L], and the summed weighted probability mass of the top k
    at `temperature` with the summed weights."""

    def fn(teacher: nnx.State, batch: dict):
        inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = nnx.merge(teacher_graphdef, teacher)(*inputs)  # [B, L, V]
        values, ids = jax.lax.top_k(logits, k)
        log_z = jax.nn.logsumexp(logits / temperature, axis=-1)  # [B, L]
        mass = jnp.sum(jnp.exp(values / temperature - log_z[..., None]), axis=-1)  # [B, L]
        return values, ids, log_z, jnp.sum(mass * batch["weights"]), jnp.sum(batch["weights"])

    return fn


def write_cache(exp: Experiment, out: str, top_k: int) -> float:
    """Writes the cache of `exp`'s teacher (exp.distill.teacher) into `out`; returns the mean
    top-k probability mass."""
    check(bool(exp.distill.teacher), "--config.distill.teacher is required: the teacher to cache.")
    check(
        0 < top_k <= exp.model.vocab_size,
        f"--top_k must be in [1, model.vocab_size={exp.model.vocab_size}], got {top_k}.",
    )
    check(jax.process_count() == 1, "llm.distill_cache runs in one process.")
    mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
    _, train_data, _ = exp.load_data()
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    shape = (exp.steps, exp.batch_size, exp.seq_len, top_k)
    kinds = ((np.float32, shape), (np.int32, shape), (np.float32, shape[:-1]))
    files = {
        name: np.lib.format.open_memmap(path / f"{name}.npy", "w+", dtype, array_shape)
        for name, (dtype, array_shape) in zip(distill.CACHE_KEYS, kinds, strict=True)
    }
    mass, weight = 0.0, 0.0
    with jax.set_mesh(mesh), partitioning.axis_rules(exp.mesh.rules):
        args = (exp.distill, exp.model, exp.data.tokenizer, mesh, exp.mesh.rules)
        graphdef, teacher, _ = distill.load_teacher(*args)
        fn = jax.jit(top_k_fn(graphdef, top_k, exp.distill.temperature))
        sharding = partitioning.batch_sharding(mesh, exp.mesh.rules)
        for step in range(exp.steps):
            batch = jax.device_put(train_data.batch(step, exp.batch_size), sharding)
            *arrays, m, w = jax.device_get(fn(teacher, batch))
            for name, array in zip(distill.CACHE_KEYS, arrays, strict=True):
                files[name][step] = array
            mass, weight = mass + float(m), weight + float(w)
    for array in files.values():
        array.flush()
    manifest = {**exp.batches_key(), "temperature": exp.distill.temperature}
    manifest.update(teacher=exp.distill.teacher, top_k=top_k)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return mass / max(weight, 1.0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config: ml_collections.ConfigDict = flags.FLAGS.config
    try:
        exp = config_lib.resolve(config)
        mass = write_cache(exp, flags.FLAGS.out, flags.FLAGS.top_k)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{flags.FLAGS.out}: top-{flags.FLAGS.top_k} logits of {exp.steps} steps; they hold "
        f"{mass:.1%} of the teacher's probability at T={exp.distill.temperature} (mean over "
        "tokens), the rest is one tail outcome in the KL.",
        flush=True,
    )


if __name__ == "__main__":
    config_lib.define_config_flag()
    flags.DEFINE_string("out", None, "Directory to write the cache to.", required=True)
    flags.DEFINE_integer("top_k", 32, "Logits kept per position.")
    app.run(main, flags_parser=config_lib.parse_flags)
