"""Train a language model: config -> data -> model -> jitted step -> checkpoints -> metrics.

  python -m llm.train --config=experiments/default.py --workdir=/tmp/default
  python -m llm.train --config=experiments/default.py --workdir=/tmp/small --config.model.num_layers=2

Rerunning the same command with the same workdir resumes from the latest checkpoint: a batch is
a pure function of (seed, step), so the data order resumes exactly too.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from data import pipeline, text_corpus
from data import tokenizer as tokenizer_lib
from llm import checkpoint, debug, distributed, flops, guard, partitioning
from llm import config as config_lib
from llm.metrics import MetricsWriter
from llm.model import Transformer
from llm.preemption import Preempted, PreemptionWatcher
from llm.train_step import Batch, TrainState, make_eval_step, make_optimizer, make_train_step

# Mistakes a user can fix; reported as one message and exit status 2, never a traceback.
USER_ERRORS = (
    config_lib.ConfigError,
    text_corpus.CorpusNotFoundError,
    tokenizer_lib.TokenizerNotFoundError,
    tokenizer_lib.TokenizerLoadError,
    pipeline.DataError,
    checkpoint.CheckpointMismatchError,
    checkpoint.CheckpointCorruptError,
    checkpoint.CheckpointSaveError,
    guard.NonFiniteError,
    partitioning.MeshError,
    PermissionError,
)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> pathlib.Path:
    """Creates `workdir`, refuses to resume with a different model, and writes config.json."""
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path).close()  # unique per process: hosts may share path
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir} is not writable ({e.strerror}): pass a --workdir you can write to."
        ) from None
    saved = path / "config.json"
    if saved.exists():
        checkpoint.check_same_model(json.loads(saved.read_text())["model"], config.model.to_dict())
    if jax.process_index() == 0:  # atomically: other hosts may be reading it
        with tempfile.NamedTemporaryFile("w", dir=path, delete=False) as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(f.name, saved)
    return path


def load_data(config: ml_collections.ConfigDict):
    """Tokenizer and the packed train and eval splits."""
    tokenizer = tokenizer_lib.Tokenizer(config.data.tokenizer or tokenizer_lib.SHIPPED_MODEL)
    config_lib.check_vocab(config, tokenizer.vocab_size)
    builder_kwargs = None
    if config.data.text_dir:
        builder_kwargs = {"config": text_corpus.config_for_directory(config.data.text_dir)}
    kwargs = dict(
        name=config.data.dataset,
        builder_kwargs=builder_kwargs,
        seq_len=config.seq_len,
        tokenizer=tokenizer,
        data_dir=config.data.data_dir or pipeline.default_data_dir(),
        seed=config.seed,
        text_key=config.data.text_key,
    )
    train = pipeline.load_dataset(split=config.data.train_split, **kwargs)
    evaluation = pipeline.load_dataset(split=config.data.eval_split, **kwargs)
    for dataset in (train, evaluation):  # too little data is a DataError now, not mid-training
        dataset.batch(0, config.batch_size)
    return tokenizer, train, evaluation


def evaluate(eval_step, params, eval_data, config, put) -> dict[str, float]:
    """Mean next-token loss and perplexity over the first `eval_batches` validation batches."""
    total, count = 0.0, 0.0
    for i in range(config.eval_batches):
        ce_sum, num = eval_step(params, put(eval_data.batch(i, config.batch_size)))
        total, count = total + float(ce_sum), count + float(num)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it has a checkpoint); returns the last metrics.

    On SIGTERM/SIGINT it saves at the next step boundary and raises `Preempted` once committed.
    """
    with PreemptionWatcher() as preemption:
        return _train(config, workdir, preemption)


class Setup(NamedTuple):
    """The train state on the mesh and what it was built with."""

    state: TrainState
    shardings: Any  # NamedShardings with the structure of `state`
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def setup_state(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    manager: ocp.CheckpointManager | None = None,
) -> Setup:
    """The train state placed by the rules table on `mesh`: `manager`'s latest checkpoint
    (resharded onto this mesh, whatever mesh saved it), else a fresh init.

    Call under `jax.set_mesh(mesh)` and `partitioning.axis_rules(config.axis_rules)`.
    """
    rules = tuple(config.axis_rules)
    cfg = config_lib.model_config(config)
    tx, schedule = make_optimizer(config.optimizer, config.steps)
    graphdef = None

    def init_state():
        nonlocal graphdef  # static structure, recorded while tracing
        graphdef, model_state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(config.seed)))
        params, _ = nnx.split_state(model_state, nnx.Param, ...)  # what the optimizer trains
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": model_state,
            "opt_state": tx.init(params),
            "guard": guard.init_guard(config),
        }

    abstract = jax.eval_shape(init_state)
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    state = None
    if manager is not None:
        state = checkpoint.restore_latest(
            manager,
            partitioning.with_shardings(abstract, shardings),
            fallback_to_previous=config.checkpoint.fallback_to_previous,
        )
    if state is not None and "guard" not in state:  # saved before llm.guard: start it afresh
        state["guard"] = jax.device_put(guard.init_guard(config), shardings["guard"])
    if state is None:
        state = jax.jit(init_state, out_shardings=shardings)()
    return Setup(state, shardings, graphdef, tx, schedule)


def compile_train_step(config: ml_collections.ConfigDict, setup: Setup, batch: Batch):
    """The train step compiled ahead of time for `batch`; its new state keeps the state's shardings."""
    step_fn = make_train_step(
        setup.graphdef,
        setup.tx,
        setup.schedule,
        grad_accum_steps=config.grad_accum_steps,
        z_loss=config.z_loss,
    )
    step_fn = guard.guarded(step_fn, config)
    jitted = jax.jit(step_fn, out_shardings=(setup.shardings, None), donate_argnums=0)
    return jitted.lower(setup.state, batch).compile()


def format_memory(report: dict[str, int]) -> str:
    """One line: per-device MiB of each entry of `partitioning.memory_report`."""
    return "memory per device: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in report.items())


def _train(config, workdir: str, preemption: PreemptionWatcher) -> dict[str, float]:
    config_lib.validate(config)
    path = prepare_workdir(workdir, config)
    mesh = partitioning.make_mesh(config.mesh.to_dict())
    rules = tuple(config.axis_rules)
    config_lib.check_sharding(config, mesh)
    tokenizer, train_data, eval_data = load_data(config)
    cfg = config_lib.model_config(config)

    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        data_sharding = partitioning.batch_sharding(mesh, rules)
        manager = checkpoint.make_manager(path, keep=config.keep_checkpoints)
        setup = setup_state(config, mesh, manager)
        state, graphdef = setup.state, setup.graphdef
        start = int(state["step"])
        logging.info("Starting at step %d of %d.", start, config.steps)

        def put(batch):
            return {
                k: jax.make_array_from_process_local_data(data_sharding, v)
                for k, v in batch.items()
            }

        def local_batch(step):
            return train_data.batch(
                step,
                config.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )

        debug.pause("compile")
        t = time.perf_counter()
        train_step = compile_train_step(config, setup, put(local_batch(start)))
        eval_step = jax.jit(make_eval_step(graphdef))
        compile_seconds = time.perf_counter() - t

        counts = flops.param_counts(cfg)
        flops_per_token = flops.train_flops_per_token(cfg, config.seq_len)
        peak = flops.peak_flops(jax.devices()[0])
        tokens_per_step = config.batch_size * config.seq_len
        print(
            f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M "
            f"non-embedding, {counts['active'] / 1e6:.2f}M active per token); "
            f"{flops_per_token / 1e6:.1f} MFLOP per trained token; "
            f"train step compiled in {compile_seconds:.1f} s; {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), "
            f"mesh {dict(mesh.shape)}\n{format_memory(partitioning.memory_report(state, train_step))}",
            flush=True,
        )
        writer = MetricsWriter(path) if jax.process_index() == 0 else None
        log_hashes = config.debug.log_batch_hashes and writer is not None

        def save(state, **kwargs):  # never a non-finite state (nonfinite="stop")
            if config.nonfinite == "stop":
                guard.raise_if_nonfinite(state, manager)
            checkpoint.save(manager, state, **kwargs)

        metrics: dict[str, float] = {}
        progress = tqdm(
            total=config.steps,
            initial=start,
            desc="train",
            dynamic_ncols=True,
            disable=jax.process_index() != 0,
        )
        tick, steps_since = time.perf_counter(), 0
        for step in range(start, config.steps):
            if preemption.should_stop(step):
                break
            batch = local_batch(step)
            if log_hashes:
                debug.log_batch_hash(path, step, train_data.batch(step, config.batch_size))
            state, step_metrics = train_step(state, put(batch))
            steps_since += 1
            progress.update(1)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                seconds = time.perf_counter() - tick
                tokens_per_second = steps_since * tokens_per_step / seconds
                achieved = tokens_per_second * flops_per_token / jax.device_count()
                metrics.update(
                    tokens_per_second=tokens_per_second,
                    tflops_per_device=achieved / 1e12,
                )
                if peak:
                    metrics["mfu"] = achieved / peak
                if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                    metrics.update(evaluate(eval_step, state["params"], eval_data, config, put))
                if writer:
                    writer.write(done, metrics)
                if config.nonfinite == "stop":  # after logging the bad values
                    guard.raise_if_nonfinite(state, manager)
                progress.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    tok_s=f"{tokens_per_second:,.0f}",
                    mfu=f"{metrics['mfu']:.1%}" if peak else "n/a",
                )
                tick, steps_since = time.perf_counter(), 0
            if config.checkpoint_every and (
                done % config.checkpoint_every == 0 or done == config.steps
            ):
                save(state)
        progress.close()
        checkpoint.wait(manager)
        if writer:
            writer.close()
        last = int(state["step"])
        if last < config.steps:  # stopped early: preempted
            if manager.latest_step() != last:
                save(state, force=True)
                checkpoint.wait(manager)
            raise Preempted(last, preemption.exit_status)
        if start < config.steps and config.sample_prompt:
            print_sample(state["params"], graphdef, tokenizer, config)
    return metrics


def print_sample(params, graphdef, tokenizer, config) -> None:
    from llm.sample import generate  # decoding is only needed at the end

    prompt = [tokenizer.bos_id] + tokenizer.encode(config.sample_prompt)
    tokens = generate(
        nnx.merge(graphdef, params),
        jnp.array([prompt], jnp.int32),
        max_new_tokens=config.sample_tokens,
        rng=jax.random.key(config.seed),
        temperature=0.8,
        top_k=40,
        vocab_limit=tokenizer.vocab_size,
    )
    print(f"sample: {tokenizer.decode(list(np.asarray(tokens[0, 1:])))}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every step of their work at INFO
    workdir = flags.FLAGS.workdir
    if not workdir:
        sys.exit("error: --workdir is required, e.g. --workdir=/tmp/run1")
    try:
        distributed.initialize()
        metrics = train_and_evaluate(flags.FLAGS.config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_status)
    if "eval_loss" in metrics:
        mfu = (
            f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a (no peak FLOP/s for this device)"
        )
        print(
            f"final: loss {metrics['loss']:.3f}, eval loss {metrics['eval_loss']:.3f} "
            f"(perplexity {metrics['eval_perplexity']:.1f}), "
            f"{metrics['tokens_per_second']:,.0f} tokens/s, "
            f"{metrics['tflops_per_device'] * 1e3:.1f} GFLOP/s per device, MFU {mfu}",
            flush=True,
        )


if __name__ == "__main__":  # flags only for the command, so other scripts can import this module
    config_lib.define_config_flag("experiments/default.py")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    app.run(main)
