"""Pipeline parallelism over the `stage` mesh axis: the loss and gradients of a batch, computed by
executing a schedule table (llm.parallel.schedules) with a `scan` over its ticks.

The stacked layers (model.scan_layers; logical axis "layers", placed on "stage" by the rules
table) split into S·v chunks; the embedding runs before them (its gradient after), the output
head and loss on the stage holding the last chunk. Per tick, each stage runs its op under
`jax.shard_map` (manual over "stage" only, so data/fsdp/tensor/expert sharding still applies
inside, MoE all-to-alls included): a forward keeps its `jax.vjp` residuals in a slot until the
schedule runs its backward, so a stage's memory follows the schedule (GPipe holds M microbatches
in flight, 1F1B at most S). A split backward (zb_h1) runs the same `vjp` twice from the slot: I
keeps only the input gradient, W only the weight gradient (XLA drops the unused half; W
recomputes the input gradients inside a chunk of several layers). Activations move forward and
gradients backward with `ppermute`. Parameters that are residuals are not copied into slots.

MoE chunks add their auxiliary losses to the loss per microbatch (the step's weighting) and
return their routing values, averaged over the microbatches: the same as one device with
gradient accumulation over the same microbatches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from llm.errors import check, check_positive
from llm.model import moe
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer, apply_stacked_blocks
from llm.parallel import partitioning, schedules
from llm.parallel.schedules import SCHEDULES

AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """config.pipeline: the schedule run when mesh.stage > 1 (ignored at mesh.stage = 1)."""

    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zb_h1
    microbatches: int = 4  # M, microbatches per (accumulation) batch
    virtual_stages: int = 1  # v, chunks per stage (interleaved_1f1b only, >= 2)

    def __post_init__(self):
        check(
            self.schedule in SCHEDULES,
            f"config.pipeline.schedule must be one of {SCHEDULES}, got {self.schedule!r}.",
        )
        check_positive(self.microbatches, "pipeline.microbatches")
        check_positive(self.virtual_stages, "pipeline.virtual_stages")
        interleaved = self.schedule == "interleaved_1f1b"
        check(
            interleaved or self.virtual_stages == 1,
            f"config.pipeline.virtual_stages={self.virtual_stages} needs "
            "pipeline.schedule=interleaved_1f1b (the others have one chunk per stage): set "
            "virtual_stages=1 or the interleaved schedule.",
        )
        check(
            not interleaved or self.virtual_stages >= 2,
            "config.pipeline.schedule=interleaved_1f1b needs pipeline.virtual_stages >= 2: set "
            "it, or use schedule=1f1b.",
        )

    def table(self, stages: int) -> schedules.Schedule:
        return schedules.build(self.schedule, stages, self.microbatches, self.virtual_stages)


def stages_of(mesh) -> int:
    return dict(mesh.shape).get(AXIS, 1)


def validate(
    cfg: PipelineConfig, model: ModelConfig, mesh, rules, batch: int, field: str = "batch_size"
) -> None:
    """The pipeline fits the model, the mesh and `batch` (sequences per accumulation step)."""
    stages = stages_of(mesh)
    if stages == 1:
        return
    m, v = cfg.microbatches, cfg.virtual_stages
    check(
        model.scan_layers,
        f"mesh.stage={stages} pipelines the stacked layers: set --config.model.scan_layers=True.",
    )
    check(
        model.num_layers % (stages * v) == 0,
        f"config.model.num_layers={model.num_layers} does not split into mesh.stage={stages} x "
        f"pipeline.virtual_stages={v} chunks: use a multiple of {stages * v} layers.",
    )
    check(
        cfg.schedule == "gpipe" or m >= stages,
        f"config.pipeline.microbatches={m} < mesh.stage={stages}: {cfg.schedule} needs at least "
        "one microbatch per stage; raise microbatches or use schedule=gpipe.",
    )
    check(
        cfg.schedule != "interleaved_1f1b" or m % stages == 0,
        f"config.pipeline.microbatches={m} is not a multiple of mesh.stage={stages}, which "
        "interleaved_1f1b needs: use a multiple of the stage count.",
    )
    split = math.prod(mesh.shape[a] for a in partitioning.mesh_axes_of("batch", rules))
    check(
        batch % (m * split) == 0,
        f"config.{field}={batch} does not split into pipeline.microbatches={m} x {split} "
        f"data-parallel shards: use a multiple of {m * split} sequences per step.",
    )
    check(
        dict(mesh.shape).get("sequence", 1) == 1,
        "mesh.stage > 1 with mesh.sequence > 1 is not supported: set one of them to 1.",
    )
    check(
        "stage" not in partitioning.mesh_axes_of("batch", rules)
        and partitioning.mesh_axes_of("layers", rules) == (AXIS,),
        'mesh.stage > 1 needs config.axis_rules to map "layers" to "stage" (and the batch '
        'not to it): add ("layers", "stage").',
    )


def describe(cfg: PipelineConfig, mesh) -> str:
    """A line for the run's banner: the schedule and its bubble fraction ("" without one)."""
    stages = stages_of(mesh)
    if stages == 1:
        return ""
    table = cfg.table(stages)
    return (
        f"pipeline: {cfg.schedule}, {stages} stages x {cfg.virtual_stages} virtual, "
        f"{cfg.microbatches} microbatches, {table.ticks} ticks, bubble fraction "
        f"{table.bubble_fraction:.3f}, up to {table.max_in_flight()} microbatch-chunks in "
        "flight per stage\n"
    )


def _to_stages(x: jax.Array, stages: int, virtual: int) -> jax.Array:
    """[L, ...] -> [S, v, L/(S v), ...]: chunk c = j·S + s at [s, j]."""
    x = x.reshape(virtual, stages, x.shape[0] // (stages * virtual), *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def _from_stages(x: jax.Array) -> jax.Array:
    """The inverse of `_to_stages`."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(-1, *x.shape[3:])


def _split_vjp(vjp_fn, known):
    """The residual leaves of `vjp_fn` that are not leaves of `known` (parameters, which the
    backward takes again rather than a copy), its treedef, and where each leaf comes from."""
    leaves, treedef = jax.tree.flatten(vjp_fn)
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(known))}
    where = tuple(ids.get(id(leaf), -1) for leaf in leaves)
    return [leaf for leaf, w in zip(leaves, where) if w < 0], treedef, where


def _join_vjp(kept, known, treedef, where):
    known_leaves, kept = jax.tree.leaves(known), iter(kept)
    return jax.tree.unflatten(treedef, [known_leaves[w] if w >= 0 else next(kept) for w in where])


def make_value_and_grad(
    graphdef: nnx.GraphDef,
    cfg: PipelineConfig,
    head_loss: Callable[[Transformer, jax.Array, dict], tuple[jax.Array, jax.Array]],
):
    """(params, rest, batch) -> ((loss_sum, (ce_sum, MoE values {layer: {name: value}})), grads),
    as jax.value_and_grad of the step's loss, pipelined over the mesh's stage axis.
    head_loss(model, hidden after the final norm, microbatch) -> (summed loss, summed
    cross-entropy); its logits are split over the vocabulary as the rules table says, so it must
    not gather from them (XLA's SPMD partitioner aborts on that inside the partly manual
    shard_map: llm.training.step's head takes the target's logit by a one-hot sum)."""

    def value_and_grad(params: nnx.State, rest: nnx.State, batch: dict):
        mesh = jax.sharding.get_abstract_mesh()
        stages, v = stages_of(mesh), cfg.virtual_stages
        table = cfg.table(stages)
        m_count = cfg.microbatches
        model_cfg = nnx.merge(graphdef, params, rest).cfg
        block_graphdef = nnx.split(nnx.merge(graphdef, params, rest).blocks)[0]
        blocks = params["blocks"]
        head = nnx.State({k: x for k, x in params.raw_mapping.items() if k != "blocks"})
        # the blocks' variables that are not differentiated (MoE expert biases), staged alike
        fixed = rest["blocks"] if "blocks" in rest else nnx.State({})
        staged, staged_fixed = jax.tree.map(lambda x: _to_stages(x, stages, v), (blocks, fixed))

        # [B, ...] -> [M, B/M, ...], microbatch m = rows m, m + M, ...: each data shard's rows
        # split into M, so no data moves.
        def to_micro(x):
            return jnp.swapaxes(x.reshape(-1, m_count, *x.shape[1:]), 0, 1)

        micro = jax.tree.map(to_micro, batch)

        def merged(head_state, chunk_state):
            state = nnx.State({**head_state.raw_mapping, "blocks": chunk_state.raw_mapping})
            return nnx.merge(graphdef, state, rest)

        # The embedding runs before the pipeline (a gather XLA partitions outside shard_map):
        # x_first: [M, B/M, L, D]; its gradient comes back from the first chunk's backwards.
        x_first, embed_vjp = jax.vjp(
            lambda h: to_micro(merged(h, blocks).embed_tokens(batch["inputs"])), head
        )

        def run_chunk(chunk, x, mb, fixed):
            """-> (x: [B/M, L, D], the chunk's MoE loss terms (summed over its layers and the
            microbatch's tokens, as the step weighs them), its MoE values {name: [n, ...]})."""
            state = nnx.merge_state(chunk, fixed)
            x, aux = apply_stacked_blocks(
                model_cfg, block_graphdef, state, x, mb["positions"], mb["segment_ids"]
            )
            penalty = jnp.zeros((), jnp.float32)
            if aux:
                per_token = jnp.sum(moe.weighted_aux_loss({0: aux}, model_cfg.moe))
                penalty = jnp.sum(mb["weights"]) * per_token
            return x, penalty, aux

        def f_mid(known, x, mb, fixed):  # known = (chunk,); the first chunk's forward too
            def fn(chunk, x):
                x, penalty, aux = run_chunk(chunk, x, mb, fixed)
                return (x, penalty), aux

            return jax.vjp(fn, *known, x, has_aux=True)

        def f_last(known, x, mb, fixed):  # known = (chunk, head)
            def fn(chunk, head_state, x):
                model = merged(head_state, chunk)
                x, penalty, aux = run_chunk(chunk, x, mb, fixed)
                loss, ce = head_loss(model, model.final_norm(x), mb)
                return loss + penalty, (ce, aux)

            return jax.vjp(fn, *known, x, has_aux=True)

        def body(staged_local, fixed_local, head, micro, x_first, kinds):
            # [v, L/(S v), ...]
            local, fixed_local = jax.tree.map(lambda x: x[0], (staged_local, fixed_local))
            stage = jax.lax.axis_index(AXIS)
            mb0 = jax.tree.map(lambda x: x[0], micro)
            chunk0, fixed0 = jax.tree.map(lambda x: x[0], (local, fixed_local))
            x_aval = jax.ShapeDtypeStruct(x_first.shape[1:], x_first.dtype)
            specs = {}  # pool -> (residual avals, treedef, where)

            def probe(pool, fwd, known, *args):
                def kept(known, *args):
                    out = fwd(known, *args, mb0, fixed0)
                    leaves, treedef, where = _split_vjp(out[1], known)
                    specs[pool] = (treedef, where)
                    return leaves

                avals = jax.eval_shape(kept, known, *args)
                specs[pool] = (avals, *specs[pool])

            x0 = jnp.zeros(x_aval.shape, x_aval.dtype)
            aux_avals = jax.eval_shape(lambda c, x: run_chunk(c, x, mb0, fixed0)[2], chunk0, x0)
            probe("first", f_mid, (chunk0,), x0)
            probe("mid", f_mid, (chunk0,), x0)
            probe("last", f_last, (chunk0, head), x0)
            sizes = table.pool_sizes
            carry = {
                "stash": {
                    p: [jnp.zeros((sizes[p] + 1, *a.shape), a.dtype) for a in specs[p][0]]
                    for p in schedules.POOLS
                    if sizes[p]
                },
                "x": {
                    p: jnp.zeros((sizes[p] + 1, *x_aval.shape), x_aval.dtype)
                    for p in ("mid", "last")
                    if sizes[p]
                },
                "dy": {
                    p: jnp.zeros((sizes[p] + 1, *x_aval.shape), x_aval.dtype)
                    for p in ("first", "mid")
                    if sizes[p]
                },
                "grad_local": jax.tree.map(jnp.zeros_like, local),
                "grad_head": jax.tree.map(jnp.zeros_like, head),
                "dx_first": jnp.zeros_like(x_first),
                "aux": jax.tree.map(lambda a: jnp.zeros((v, *a.shape), a.dtype), aux_avals),
                "loss": jnp.zeros((), jnp.float32),
                "ce": jnp.zeros((), jnp.float32),
            }

            def chunk_of(j):  # (its parameters, its fixed variables)
                return jax.tree.map(lambda x: x[j], (local, fixed_local))

            def add_forward(carry, j, loss, aux):  # a chunk's loss terms and MoE values [n, ...]
                carry["loss"] = carry["loss"] + loss
                carry["aux"] = jax.tree.map(lambda a, d: a.at[j].add(d), carry["aux"], aux)

            def add_grad(carry, j, d_chunk, d_head=None):
                carry["grad_local"] = jax.tree.map(
                    lambda g, d: g.at[j].add(d), carry["grad_local"], d_chunk
                )
                if d_head is not None:
                    carry["grad_head"] = jax.tree.map(jnp.add, carry["grad_head"], d_head)

            def stash(carry, pool, slot, vjp_fn, known):
                kept, _, where = _split_vjp(vjp_fn, known)
                assert where == specs[pool][2], "the forward's residuals changed between traces"
                carry["stash"][pool] = [
                    buf.at[slot].set(leaf) for buf, leaf in zip(carry["stash"][pool], kept)
                ]

            def restore(carry, pool, slot, known):
                kept = [buf[slot] for buf in carry["stash"][pool]]
                return _join_vjp(kept, known, *specs[pool][1:])

            zeros = jnp.zeros(x_aval.shape, x_aval.dtype)

            def op_fn(kind):
                def run(carry, m, j, slot):
                    send_x = send_dy = zeros
                    if kind == schedules.IDLE:
                        return carry, send_x, send_dy
                    carry = dict(carry, stash=dict(carry["stash"]))
                    phase, pool = schedules.phase_and_pool(kind)
                    mb = jax.tree.map(lambda x: x[m], micro)
                    chunk, fixed = chunk_of(j)
                    known = (chunk, head) if pool == "last" else (chunk,)
                    one = jnp.ones((), jnp.float32)  # the cotangent of a summed loss
                    if phase == "F":
                        if pool == "last":
                            x = carry["x"]["last"][slot]
                            loss, vjp_fn, (ce, aux) = f_last(known, x, mb, fixed)
                            carry["ce"] = carry["ce"] + ce
                        else:
                            x = x_first[m] if pool == "first" else carry["x"]["mid"][slot]
                            (send_x, loss), vjp_fn, aux = f_mid(known, x, mb, fixed)
                        stash(carry, pool, slot, vjp_fn, known)
                        add_forward(carry, j, loss, aux)
                        return carry, send_x, send_dy
                    vjp_fn = restore(carry, pool, slot, known)
                    *d_known, dx = vjp_fn(one if pool == "last" else (carry["dy"][pool][slot], one))
                    if phase != "I":  # B or W: the weight gradient (I's is never computed)
                        add_grad(carry, j, *d_known)
                    if phase != "W" and pool == "first":  # B or I: the input gradient
                        carry["dx_first"] = carry["dx_first"].at[m].set(dx)
                    elif phase != "W":
                        send_dy = dx
                    return carry, send_x, send_dy

                return run

            present = set(np.unique(table.tables["kind"]).tolist())  # the others: never traced
            branches = [op_fn(k if k in present else schedules.IDLE) for k in schedules.KINDS]

            def tick(carry, row):
                row = {k: x[stage] for k, x in row.items()}
                carry, send_x, send_dy = jax.lax.switch(
                    row["kind"], branches, carry, row["micro"], row["chunk"], row["slot"]
                )
                recv_x = jax.lax.ppermute(
                    send_x, AXIS, [(i, (i + 1) % stages) for i in range(stages)]
                )
                recv_dy = jax.lax.ppermute(
                    send_dy, AXIS, [(i, (i - 1) % stages) for i in range(stages)]
                )
                carry = dict(carry, x=dict(carry["x"]), dy=dict(carry["dy"]))
                for pool in carry["x"]:
                    carry["x"][pool] = carry["x"][pool].at[row[f"recv_x_{pool}"]].set(recv_x)
                for pool in carry["dy"]:
                    carry["dy"][pool] = carry["dy"][pool].at[row[f"recv_dy_{pool}"]].set(recv_dy)
                return carry, None

            carry, _ = jax.lax.scan(tick, carry, kinds)
            per_stage = jax.tree.map(lambda g: g[None], (carry["grad_local"], carry["aux"]))
            totals = (carry["grad_head"], carry["dx_first"], carry["loss"], carry["ce"])
            return *per_stage, *jax.lax.psum(totals, AXIS)

        tables = {k: jnp.asarray(x) for k, x in table.tables.items()}
        run = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(AXIS), P(AXIS), P(), P(), P(), P()),
            out_specs=(P(AXIS), P(AXIS), P(), P(), P(), P()),
            axis_names={AXIS},
            check_vma=False,
        )
        outputs = run(staged, staged_fixed, head, micro, x_first, tables)
        grad_staged, aux_staged, grad_head, dx_first, loss, ce = outputs
        grad_head = jax.tree.map(jnp.add, grad_head, embed_vjp(dx_first)[0])
        grad_blocks = jax.tree.map(_from_stages, grad_staged)
        grads = nnx.State({**grad_head.raw_mapping, "blocks": grad_blocks.raw_mapping})
        # MoE values [layers, ...], averaged over the microbatches as gradient accumulation does
        aux = jax.tree.map(lambda a: _from_stages(a) / m_count, aux_staged)
        layers = range(model_cfg.num_layers) if aux else ()
        return (loss, (ce, {i: jax.tree.map(lambda a, i=i: a[i], aux) for i in layers})), grads

    return value_and_grad
