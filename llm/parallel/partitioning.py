"""Where tensors live: the device mesh, and logical axis names -> mesh axes.

Model code names the dimensions of its parameters and activations with logical axes
("batch", "embed", "heads", ...). One rules table (the config's `axis_rules`) maps each logical
axis to mesh axes; this module is the only place that turns names into shardings.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llm.errors import check, is_int

MeshAxes = str | tuple[str, ...] | None
AxisRules = Sequence[tuple[str, MeshAxes]]
# Outermost to innermost: jax.make_mesh lays the last axes on the fastest links, so tensor
# parallelism (a collective in every layer) gets neighbouring devices and data parallelism (one
# gradient reduction per step) spans hosts. "sequence" splits the sequence (context parallelism,
# llm.parallel.context); "expert" holds MoE experts (llm.model.moe) and splits the batch like data
# parallelism. "stage" (outermost: one activation transfer per microbatch, fit for slow links)
# holds pipeline stages, the stacked layers split (llm.parallel.pipeline).
MESH_AXES = ("stage", "data", "fsdp", "expert", "sequence", "tensor")


class MeshError(ValueError):
    """Mesh sizes that do not fit the devices; the message says how to fix them."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """config.mesh (axis sizes, one may be -1) and config.axis_rules, checked when built."""

    sizes: tuple[tuple[str, int], ...]  # (mesh axis, size) pairs
    rules: tuple[tuple[str, MeshAxes], ...]  # logical axis -> mesh axes

    def __post_init__(self):
        unknown = {axis for axis, _ in self.sizes} - set(MESH_AXES)
        check(
            not unknown,
            f"config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.",
        )
        for axis, size in self.sizes:
            check(
                is_int(size) and (size > 0 or size == -1),
                f"config.mesh.{axis} must be a positive integer or -1 (all remaining devices), "
                f"got {size!r}.",
            )
        named = {a for name, _ in self.rules for a in mesh_axes_of(name, self.rules)}
        check(
            named <= set(MESH_AXES),
            f"config.axis_rules names unknown mesh axes {sorted(named - set(MESH_AXES))}; "
            f"the mesh axes are {MESH_AXES}.",
        )


def check_sharding(dims: dict[str, tuple[str, int]], mesh: Mesh, rules: AxisRules) -> None:
    """Every dimension the rules table shards splits evenly over its mesh axes. `dims`: logical
    axis -> (the config field that sets its size, the size)."""
    for name, (field, size) in dims.items():
        axes = mesh_axes_of(name, rules)
        shards = math.prod(mesh.shape[a] for a in axes)
        over = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        check(
            size % shards == 0,
            f"config.{field}={size} does not split over {over} ({shards} devices; axis_rules "
            f"shard {name!r} over {axes}): use a multiple of {shards} for config.{field}, or "
            "shrink those mesh axes (or change config.axis_rules).",
        )


_RULES: contextvars.ContextVar[AxisRules | None] = contextvars.ContextVar(
    "axis_rules", default=None
)


@contextlib.contextmanager
def axis_rules(rules: AxisRules) -> Iterator[None]:
    """Within this context, `shard` constrains activations according to `rules`."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> AxisRules | None:
    """The rules table of the enclosing `axis_rules` context (None outside one)."""
    return _RULES.get()


def logical_to_spec(names: Sequence[str | None], rules: AxisRules) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec; a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for name in names:
        mesh_axes = mesh_axes_of(name, rules) if name is not None else ()
        if not mesh_axes:
            spec.append(None)
            continue
        free = tuple(a for a in mesh_axes if a not in used)
        used.update(free)
        spec.append(free[0] if len(free) == 1 else (free or None))
    return PartitionSpec(*spec)


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` to the sharding its logical `names` map to (no-op without a mesh)."""
    rules = current_rules()
    if rules is None or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def current_mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes logical axis `name` maps to under the active rules and mesh (() without)."""
    rules = _RULES.get()
    if rules is None or jax.sharding.get_abstract_mesh().empty:
        return ()
    return mesh_axes_of(name, rules)


def logical_shard_map(fn, in_names: Any, out_names: Any):
    """`fn` run per device by `jax.shard_map` over the active mesh, its arguments and results split
    as their logical names say (one tuple of names per array, in pytrees matching `fn`'s arguments
    and results); `fn` itself without a mesh or rules. Inside, collectives name the mesh axes of
    `current_mesh_axes`."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return fn

    def is_names(n) -> bool:
        return isinstance(n, tuple) and all(a is None or isinstance(a, str) for a in n)

    def specs(names):
        return jax.tree.map(lambda n: logical_to_spec(n, rules), names, is_leaf=is_names)

    return jax.shard_map(fn, mesh=mesh, in_specs=specs(in_names), out_specs=specs(out_names))


def mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 size to the remaining devices and checks the product."""
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError(
            f"mesh: at most one axis may be -1, got {fill}; give explicit sizes to the others."
        )
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise MeshError(
                f"mesh: {num_devices} devices are not divisible by the fixed axis sizes {sizes}."
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(
            f"mesh: sizes {sizes} multiply to {math.prod(sizes.values())}, but there are {num_devices} "
            "devices; make the product equal the device count (or set one axis to -1)."
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES over all (or the given) devices, in topology-aware order."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_axes_of(name: str, rules: AxisRules) -> tuple[str, ...]:
    """The mesh axes the rules table maps logical axis `name` to (empty: replicated)."""
    mesh_axes = dict(rules).get(name)
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def state_shardings(state: Any, mesh: Mesh, rules: AxisRules) -> Any:
    """NamedShardings with the structure of `state`: each nnx.Variable is placed by its logical
    `out_sharding` names; every other leaf (step counters, ...) is replicated."""

    def sharding_of(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding") or ()
            return x.replace(NamedSharding(mesh, logical_to_spec(names, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays (jax.ShapeDtypeStruct) that carry their target sharding."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def batch_sharding(mesh: Mesh, rules: AxisRules) -> NamedSharding:
    """Sharding of a [batch, seq] input array."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """(index, count): this process's devices need block `index` of the batch's `count` equal
    row blocks (count < process count where processes hold replicas, e.g. pipeline stages)."""
    shape = (batch_size, sharding.mesh.size)
    starts = {i[0].start or 0 for i in sharding.addressable_devices_indices_map(shape).values()}
    shards = math.prod(sharding.mesh.shape[a] for a in jax.tree.leaves(sharding.spec[0]))
    local = len(starts) * batch_size // shards  # rows this process holds
    if max(starts) + batch_size // shards - min(starts) != local:
        raise MeshError("mesh: a process's devices hold rows of the batch that are not contiguous.")
    return min(starts) // local, batch_size // local


def bytes_per_device(tree: Any) -> int:
    """Bytes of the largest shard per leaf of `tree` (arrays, or abstract arrays with a sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def memory_report(state: Any, compiled: jax.stages.Compiled) -> dict[str, int]:
    """Per-device bytes: the train state's parameters and optimizer state (from their shardings),
    and the compiled step's temporaries (activations, gradients, ...) from XLA's memory analysis."""
    report = {
        "params": bytes_per_device(state.params),
        "optimizer": bytes_per_device(state.opt_state),
    }
    analysis = compiled.memory_analysis()
    if analysis is not None:  # some backends do not report
        report["temp"] = analysis.temp_size_in_bytes
        report["arguments"] = analysis.argument_size_in_bytes
    return report
