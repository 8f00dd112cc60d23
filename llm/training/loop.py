"""The training loop: experiment -> data -> state on the mesh -> compiled step -> checkpoints and
metrics, in named steps (`run` reads top to bottom; each "every N steps, or at the end" is
`_due`). A batch is a pure function of (seed, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from llm.errors import check
from llm.harness.run import trainer_evaluator
from llm.model import lora, mup
from llm.model.decode import generate
from llm.model.transformer import Transformer
from llm.parallel import partitioning, pipeline
from llm.science import coordinates, flops
from llm.training import checkpoint, debug, distill, dpo, guard, init_from, prune
from llm.training import workdir as workdir_lib
from llm.training.console import Console
from llm.training.experiment import Experiment
from llm.training.instruments import Profile, Throughput, format_memory
from llm.training.metrics import MetricsWriter, read_metrics
from llm.training.optimizer import make_optimizer
from llm.training.preemption import Preempted, PreemptionWatcher
from llm.training.state import Batch, TrainState
from llm.training.step import make_eval_step, make_train_step


class Setup(NamedTuple):
    """The train state on the mesh and what it was built with."""

    state: TrainState
    shardings: Any  # NamedShardings with the structure of `state`
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    distiller: distill.Distiller | None = None  # with config.distill


def setup_state(
    exp: Experiment, mesh: jax.sharding.Mesh, manager: ocp.CheckpointManager | None = None
) -> Setup:
    """The train state placed by the rules table on `mesh`: `manager`'s latest checkpoint
    (resharded onto this mesh, whatever mesh saved it), else a fresh init.

    Call under `jax.set_mesh(mesh)` and `partitioning.axis_rules(exp.mesh.rules)`.
    """
    tx, schedule = make_optimizer(exp.optimizer, exp.schedule_length, mup.lr_multipliers(exp.model))
    tx = prune.masked(tx, exp.prune)
    graphdef = None

    def init_state(base: nnx.State | None = None) -> TrainState:
        nonlocal graphdef  # static structure, recorded while tracing
        graphdef, state = fresh_state(exp, tx, base)
        return state

    abstract = jax.eval_shape(init_state)
    shardings = partitioning.state_shardings(abstract, mesh, exp.mesh.rules)
    state = None
    if manager is not None:
        state = checkpoint.restore_latest(
            manager,
            partitioning.with_shardings(abstract, shardings),
            fallback_to_previous=exp.checkpoint.fallback_to_previous,
        )
    if state is not None and state.guard is None:  # saved before llm.training.guard: afresh
        state = state.replace(guard=jax.device_put(guard.init_guard(exp.guard), shardings.guard))
    if state is None:  # fresh: the init_from source's weights (+ adapters), a fresh optimizer
        base = init_from.load_model(exp.init_from, exp.model, mesh, exp.mesh.rules)
        state = jax.jit(init_state, out_shardings=shardings)(base)
    distiller, teacher = distill.make(
        exp.distill, exp.model, exp.data.tokenizer, mesh, exp.mesh.rules
    )
    if teacher is not None:  # the frozen teacher rides in the state, never checkpointed
        state = state.replace(teacher=teacher)
        shardings = shardings.replace(teacher=jax.tree.map(lambda x: x.sharding, teacher))
    return Setup(state, shardings, graphdef, tx, schedule, distiller)


def fresh_state(
    exp: Experiment, tx: optax.GradientTransformation, base: nnx.State | None = None
) -> tuple[nnx.GraphDef, TrainState]:
    """A new model (with `base`'s weights if given) and its LoRA adapters (llm.model.lora), and
    a fresh optimizer state for what it trains."""
    model = Transformer(exp.model, rngs=nnx.Rngs(exp.seed))
    if base is not None:
        nnx.update(model, base)
    lora.attach(model, exp.lora, exp.seed)
    graphdef, model_state = nnx.split(model)
    params, _ = nnx.split_state(model_state, lora.trainable(exp.lora), ...)  # what is trained
    step = jnp.zeros((), jnp.int32)
    return graphdef, TrainState(step, model_state, tx.init(params), guard.init_guard(exp.guard))


def compile_train_step(exp: Experiment, setup: Setup, batch: Batch):
    """The train step compiled ahead of time for `batch`; its new state keeps the state's shardings."""
    step_fn = make_train_step(
        setup.graphdef,
        setup.tx,
        setup.schedule,
        grad_accum_steps=exp.grad_accum_steps,
        z_loss=exp.z_loss,
        loss=exp.loss,
        distill=setup.distiller,
        pipeline_cfg=exp.pipeline,
        trainable=lora.trainable(exp.lora),
        dropout_seed=exp.seed if exp.lora.dropout else None,
    )
    if exp.post_training.format == "preference":  # DPO, IPO, SimPO
        step_fn = dpo.make_train_step(setup.graphdef, setup.tx, setup.schedule, exp)
    step_fn = guard.guarded(step_fn, exp.guard)
    jitted = jax.jit(step_fn, out_shardings=(setup.shardings, None), donate_argnums=0)
    return jitted.lower(setup.state, batch).compile()


def evaluate(eval_step, params, eval_data, exp: Experiment, put) -> dict[str, float]:
    """Mean next-token loss and perplexity over the first `eval_batches` validation batches."""
    total, count = 0.0, 0.0
    for i in range(exp.eval_batches):
        ce_sum, num = eval_step(params, put(eval_data.batch(i, exp.batch_size)))
        total, count = total + float(ce_sum), count + float(num)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def _due(done: int, every: int, steps: int) -> bool:
    """Every `every` steps (0: never), and at the last step."""
    return bool(every) and (done % every == 0 or done == steps)


def run(exp: Experiment, workdir: str, preemption: PreemptionWatcher) -> dict[str, float]:
    """Trains `exp` in `workdir` (resuming if it has a checkpoint); returns the last metrics.

    Holds the workdir's lock throughout. Raises `Preempted` once a signalled run has saved and
    committed.
    """
    check(
        not exp.model.quant.weights,
        f"config.quant.weights={exp.model.quant.weights!r}: a run quantized by llm.quantize "
        "evaluates and samples but does not train; train the float run, or set quant.weights=''.",
    )
    mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
    exp.check_fits(mesh)  # before the workdir is touched
    path = workdir_lib.create(workdir)
    with workdir_lib.lock(path):
        return _run_locked(exp, mesh, path, preemption)


def _resumed(exp: Experiment, path: pathlib.Path) -> tuple[Experiment, list]:
    """`exp` as it resumes the run in `path`: the changes from the run's config (refused by the
    resume policy, see llm.training.workdir) and, under resume_schedule="original", the
    learning-rate schedule the run has trained with."""
    recorded = workdir_lib.read_config(path)
    if recorded is None:
        return exp, []
    changed = workdir_lib.check_resume(recorded, json.loads(exp.config_json), exp.resume_policy)
    history = workdir_lib.read_history(path)
    if exp.resume_schedule == "original" and history and "schedule" in history[-1]:
        last = history[-1]["schedule"]  # the schedule the run has trained with
        exp = dataclasses.replace(
            exp,
            schedule_steps=last["steps"],
            optimizer=dataclasses.replace(exp.optimizer, warmup_steps=last["warmup_steps"]),
        )
    return exp, changed


def _run_locked(
    exp: Experiment, mesh: jax.sharding.Mesh, path: pathlib.Path, preemption: PreemptionWatcher
) -> dict[str, float]:
    exp, changed = _resumed(exp, path)
    if exp.init_from and not any((path / "checkpoints").glob("[0-9]*")):  # a fresh start
        init_from.check_source(exp.init_from)
    tokenizer, train_data, eval_data = exp.load_data()
    cache = distill.Cache(exp.distill, exp.batches_key(), exp.steps) if exp.distill.cache else None
    with jax.set_mesh(mesh), partitioning.axis_rules(exp.mesh.rules):
        data_sharding = partitioning.batch_sharding(mesh, exp.mesh.rules)
        manager = checkpoint.make_manager(path, keep=exp.checkpoint.keep)
        try:
            setup = setup_state(exp, mesh, manager)
        except checkpoint.CheckpointMismatchError as e:
            if changed:
                raise checkpoint.CheckpointMismatchError(
                    f"{e}; {workdir_lib.explain_changes(changed)}: resume with the recorded values, or pass a new "
                    "--workdir."
                ) from None
            raise
        state = setup.state
        start = int(state.step)
        check(
            start <= exp.steps,
            f"config.steps={exp.steps} is below this workdir's checkpoint (step {start}): pass "
            f"--config.steps={start} or more to continue it, or a new --workdir.",
        )
        if start == exp.steps:  # nothing to compile or train
            return _finished(path, start, exp.steps)
        workdir_lib.record_start(
            path,
            exp.config_json,
            start,
            changed,
            {"steps": exp.schedule_length, "warmup_steps": exp.optimizer.warmup_steps},
        )
        logging.info("Starting at step %d of %d.", start, exp.steps)

        def put(batch):
            return {
                k: jax.make_array_from_process_local_data(data_sharding, v)
                for k, v in batch.items()
            }

        rows, blocks = partitioning.process_rows(data_sharding, exp.batch_size)

        def local_batch(step):
            where = {"process_index": rows, "process_count": blocks}
            batch = train_data.batch(step, exp.batch_size, **where)
            return {**batch, **cache.batch(step, **where)} if cache else batch

        eval_step, evaluate_fn = jax.jit(make_eval_step(setup.graphdef, exp.loss)), evaluate
        if exp.post_training.format == "preference":  # batches carry the frozen reference
            put, eval_step, evaluate_fn = dpo.loop_parts(exp, setup, put)
        harness = trainer_evaluator(
            exp.harness, setup.graphdef, tokenizer, mesh, exp.mesh.rules, exp.seq_len
        )  # lm-eval tasks (config.eval); unknown names are refused before compiling
        debug.pause("compile")
        t = time.perf_counter()
        train_step = compile_train_step(exp, setup, put(local_batch(start)))
        rms_step = jax.jit(functools.partial(coordinates.batch_rms, setup.graphdef))
        sparsity_step = jax.jit(functools.partial(prune.sparsity, exp.prune))
        flops_per_token = flops.train_flops_per_token(exp.model, exp.seq_len)
        _print_banner(exp, flops_per_token, mesh, time.perf_counter() - t, state, train_step)
        teacher_flops = setup.distiller.teacher_flops(exp.seq_len) if setup.distiller else 0.0
        writer = None
        if jax.process_index() == 0:
            writer = MetricsWriter(path, tracker=exp.tracker, config=json.loads(exp.config_json))

        def save(state, **kwargs):  # never a non-finite state (nonfinite="stop")
            if exp.guard.nonfinite == "stop":
                guard.raise_if_nonfinite(state, manager)
            checkpoint.save(manager, state, **kwargs)

        metrics: dict[str, float] = {}
        console = Console(exp.steps, start)
        throughput = Throughput(exp, flops_per_token, teacher_flops)
        profile = Profile(path / "profile", exp.profile_start, exp.profile_steps)
        for step in range(start, exp.steps):
            if preemption.should_stop(step):
                break
            profile.before(step)
            if exp.log_batch_hashes and writer is not None:
                debug.log_batch_hash(path, step, train_data.batch(step, exp.batch_size))
            batch = put(local_batch(step))
            state, step_metrics = train_step(state, batch)
            throughput.steps += 1
            console.step()
            done = step + 1
            profile.after(done, state)
            evaluate_now = _due(done, exp.eval_every, exp.steps)  # on its own schedule
            if evaluate_now or _due(done, exp.log_every, exp.steps):
                metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                metrics.update(throughput.measure())
                if exp.log_activation_rms:  # the trained model on this step's batch
                    rms = jax.device_get(rms_step(state.params, batch))
                    metrics.update({f"rms/{k}": float(v) for k, v in rms.items()})
                if exp.prune.enabled:
                    sparsity = jax.device_get(sparsity_step(state.params))
                    metrics.update({k: float(v) for k, v in sparsity.items()})
                if evaluate_now:
                    metrics.update(evaluate_fn(eval_step, state.params, eval_data, exp, put))
                    metrics.update(harness(state.params))
                if writer:
                    writer.write(done, metrics)
                console.log(done, metrics)
                if exp.guard.nonfinite == "stop":  # after logging the bad values
                    guard.raise_if_nonfinite(state, manager)
            if _due(done, exp.checkpoint.every, exp.steps):
                save(state)
        console.close()
        profile.stop(state)
        checkpoint.wait(manager)
        if writer:
            writer.close()
        _stop_if_preempted(state, exp, manager, save, preemption)
        if exp.sample_prompt:
            print_sample(state.params, setup.graphdef, tokenizer, exp)
    return metrics


def layer_schedule(cfg) -> str:
    """Each layer's attention pattern and MLP, runs of equal layers merged: "sliding+moe x3, dense"."""
    kinds = [
        p + ("+moe" if cfg.moe.is_moe_layer(i) else "") for i, p in enumerate(cfg.layer_patterns)
    ]
    runs: list[list] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return ", ".join(kind if n == 1 else f"{kind} x{n}" for kind, n in runs)


def _print_banner(
    exp: Experiment, flops_per_token: float, mesh, compile_seconds: float, state, train_step
) -> None:
    """The model's size, layers and FLOPs, the run's steps, the compile time, the devices and
    the memory per device."""
    counts = flops.param_counts(exp.model)
    flops_per_step = flops_per_token * exp.tokens_per_step
    print(
        f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M "
        f"non-embedding, {counts['active'] / 1e6:.2f}M active per token); "
        f"layers: {layer_schedule(exp.model)}\n"
        f"run: {exp.steps} steps x {exp.tokens_per_step:,} tokens; "
        f"{flops_per_token / 1e6:.1f} MFLOP per trained token, {flops_per_step:.3g} FLOPs per step, "
        f"{flops_per_step * exp.steps:.3g} in all\n"
        f"train step compiled in {compile_seconds:.1f} s; {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), "
        f"mesh {dict(mesh.shape)}\n{pipeline.describe(exp.pipeline, mesh)}"
        f"{format_memory(partitioning.memory_report(state, train_step))}",
        flush=True,
    )


def _finished(path: pathlib.Path, step: int, steps: int) -> dict[str, float]:
    """Says that the run in `path` is finished; its last logged metrics."""
    if jax.process_index() == 0:
        print(f"{path}: this run is finished (step {step} of {steps}).", flush=True)
    records = read_metrics(path) if (path / "metrics.jsonl").exists() else []
    return {k: v for k, v in records[-1].items() if k != "step"} if records else {}


def _stop_if_preempted(state, exp: Experiment, manager, save, preemption) -> None:
    """A run stopped before its last step was preempted: save it (if not saved) and raise."""
    last = int(state.step)
    if last < exp.steps:
        if manager.latest_step() != last:
            save(state, force=True)
            checkpoint.wait(manager)
        raise Preempted(last, preemption.exit_status)


def print_sample(params, graphdef, tokenizer, exp: Experiment) -> None:
    """Continues `exp.sample_prompt` with the trained model."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(exp.sample_prompt)
    tokens = generate(
        nnx.merge(graphdef, params),
        jnp.array([prompt], jnp.int32),
        max_new_tokens=exp.sample_tokens,
        rng=jax.random.key(exp.seed),
        temperature=0.8,
        top_k=40,
        vocab_limit=tokenizer.vocab_size,
    )
    print(f"sample: {tokenizer.decode(list(np.asarray(tokens[0, 1:])))}", flush=True)
