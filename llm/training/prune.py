"""`config.prune`: weights pruned while training, as the optimizer's last transform.

    --config.prune.method=magnitude --config.prune.sparsity=0.5 --config.prune.start=100 \
      --config.prune.end=200     # unstructured: the smallest |w| of each weight, cubic ramp
    --config.prune.method=2:4 --config.prune.start=100   # semi-structured N:M from step 100

The masks live in the optimizer state (`masked`), so they are checkpointed, resharded and
resumed with it. After each update a pruned weight is set to exactly 0 (its update is -w), so it
stays 0 through AdamW's steps and weight decay. Masks only grow: a new mask is chosen among the
weights the old one kept, so a pruned weight never comes back.

magnitude (Zhu & Gupta 2017): at step t in [start, end] each target keeps all but round(s(t) * n)
of its n weights, s(t) = sparsity * (1 - (1 - (t - start) / (end - start))^3) (s = sparsity if
end == start); after end the masks are fixed.
N:M (e.g. "2:4", NVIDIA's sparse tensor cores): at step `start`, of every M consecutive weights
along a target's input (contraction) axis the N largest |w| are kept; the pattern is then fixed.

Targets (`prune.targets`, comma-separated): attention (wq wk wv wo), mlp (dense MLPs, shared
experts included), experts (the routed experts' weights), embeddings (the token table and the
untied output projection; only when asked). Norm scales, biases, routers and NSA gates never.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llm.errors import check, is_int
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer

TARGETS = ("attention", "mlp", "experts", "embeddings")

# parameter name -> (target, its input axis counted from the end: N:M groups run along it)
WEIGHTS = {
    "wq": ("attention", -3),  # [D, H, Dh]
    "wk": ("attention", -3),  # [D, K, Dh]
    "wv": ("attention", -3),  # [D, K, Dh]
    "wo": ("attention", -2),  # [H, Dh, D]
    "w_gate": ("mlp", -2),  # [D, F], or [E, D, F] for experts
    "w_up": ("mlp", -2),  # [D, F] or [E, D, F]
    "w_down": ("mlp", -2),  # [F, D] or [E, F, D]
    "embed": ("embeddings", -1),  # [V, D]: the tied output projection contracts over D
    "unembed": ("embeddings", -2),  # [D, V]
}


def _n_m(method: str) -> tuple[int, int] | None:
    """ "2:4" -> (2, 4); None for other methods."""
    match = re.fullmatch(r"(\d+):(\d+)", method)
    return (int(match[1]), int(match[2])) if match else None


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """config.prune (module docstring)."""

    method: str = "none"  # none | magnitude | N:M such as 2:4
    sparsity: float = 0.5  # magnitude: the final fraction of zeros in each target weight
    start: int = 0  # first step pruned (N:M: the step the pattern is chosen)
    end: int = 0  # magnitude: the step `sparsity` is reached (cubic ramp from start)
    targets: str = "attention,mlp,experts"  # comma-separated, of TARGETS

    def __post_init__(self):
        n_m = _n_m(self.method)
        check(
            self.method in ("none", "magnitude") or (n_m is not None and 0 < n_m[0] < n_m[1]),
            f"config.prune.method must be none, magnitude or N:M with 0 < N < M (e.g. 2:4), got "
            f"{self.method!r}.",
        )
        check(
            isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1,
            f"config.prune.sparsity must be in [0, 1), got {self.sparsity!r}: set e.g. "
            "--config.prune.sparsity=0.5.",
        )
        check(
            is_int(self.start) and is_int(self.end) and 0 <= self.start,
            f"config.prune.start and end must be steps >= 0, got {self.start!r}, {self.end!r}.",
        )
        check(
            self.end >= self.start or n_m is not None,
            f"config.prune.end={self.end} is before prune.start={self.start}: set end >= start.",
        )
        unknown = sorted(set(self.target_list) - set(TARGETS))
        check(
            not unknown and bool(self.target_list),
            f"config.prune.targets={self.targets!r} has unknown targets {unknown}: use a "
            f"comma-separated list of {TARGETS}.",
        )

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _target(cfg: PruneConfig, path: tuple, variable: Any) -> tuple[str, int] | None:
    """(target, input axis) of the parameter at `path` if `cfg` prunes it, else None."""
    name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
    if name not in WEIGHTS:
        return None
    target, axis = WEIGHTS[name]
    if target == "mlp" and "expert" in (variable.get_metadata().get("out_sharding") or ()):
        target = "experts"
    return (target, axis) if target in cfg.target_list else None


def targets(cfg: PruneConfig, params: nnx.State) -> dict[str, tuple[Any, str, int]]:
    """keystr of each pruned array's path -> (its nnx.Variable, target, input axis)."""
    found = {}
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    for path, variable in leaves:
        if _is_variable(variable) and (hit := _target(cfg, path, variable)):
            key = jax.tree_util.keystr((*path, jax.tree_util.GetAttrKey("value")))
            found[key] = (variable, *hit)
    return found


def check_model(cfg: PruneConfig, model: ModelConfig) -> None:
    """ConfigError unless the targets select weights of `model` and, for N:M, each target's input
    width is a multiple of M."""
    if not cfg.enabled:
        return
    abstract = jax.eval_shape(lambda: nnx.state(Transformer(model, rngs=nnx.Rngs(0)), nnx.Param))
    found = targets(cfg, abstract)
    check(
        bool(found),
        f"config.prune.targets={cfg.targets!r} selects no weight of this model: add attention "
        "or mlp.",
    )
    if (n_m := _n_m(cfg.method)) is not None:
        for key, (variable, target, axis) in found.items():
            width = variable.shape[axis]
            check(
                width % n_m[1] == 0,
                f"config.prune.method={cfg.method!r}: {key}'s input width {width} is not a "
                f"multiple of {n_m[1]}: change the model's width or drop {target!r} from "
                "prune.targets.",
            )


def schedule(cfg: PruneConfig, step: jax.Array) -> jax.Array:
    """magnitude: the sparsity of the masks chosen at 0-based step `step` (module docstring)."""
    span = max(cfg.end - cfg.start, 1)
    progress = jnp.clip((step - cfg.start) / span, 0.0, 1.0)
    if cfg.end == cfg.start:
        progress = jnp.where(step >= cfg.start, 1.0, 0.0)
    return cfg.sparsity * (1.0 - (1.0 - progress) ** 3)


def magnitude_mask(w: jax.Array, sparsity: jax.Array) -> jax.Array:
    """bool[w.shape]: False at the round(sparsity * w.size) smallest |w| (ties: the first)."""
    flat = jnp.abs(w).reshape(-1)
    pruned = jnp.round(sparsity * flat.size).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)  # smallest first
    keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) >= pruned)
    return keep.reshape(w.shape)


def n_m_mask(w: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """bool[w.shape]: the n largest |w| of every m consecutive along `axis` (ties: the first)."""
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    rank = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1)
    return jnp.moveaxis((rank < n).reshape(moved.shape), -1, axis)


def _new_mask(cfg: PruneConfig, step, w, old, axis: int) -> jax.Array:
    """The mask after step `step` (0-based) for the updated weight `w`, chosen among `old`'s."""
    w = jnp.where(old, w, 0)  # masks only grow: pruned weights are the smallest
    if (n_m := _n_m(cfg.method)) is not None:
        return jax.lax.cond(step == cfg.start, lambda: n_m_mask(w, *n_m, axis), lambda: old)
    active = (step >= cfg.start) & (step <= cfg.end)
    return jax.lax.cond(active, lambda: magnitude_mask(w, schedule(cfg, step)), lambda: old)


def masked(tx: optax.GradientTransformation, cfg: PruneConfig) -> optax.GradientTransformation:
    """`tx`, then pruning: its state {"step", "masks"} holds a bool mask per target (with the
    target's sharding), and a pruned weight's update sets it to exactly 0. `tx` if disabled."""
    if not cfg.enabled:
        return tx

    def init(params):
        masks = {}
        for path, variable in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
            if _is_variable(variable) and _target(cfg, path, variable):
                node = masks
                for key in path[:-1]:
                    node = node.setdefault(key.key, {})
                node[path[-1].key] = variable.replace(jnp.ones(variable.shape, bool))
        return {"step": jnp.zeros((), jnp.int32), "masks": masks}

    def update(updates, state, params):
        step = state["step"]
        masks = jax.tree_util.tree_leaves_with_path(state["masks"])
        old = {jax.tree_util.keystr(p): m for p, m in masks}
        new = {}

        def prune(path, u, w):
            key = jax.tree_util.keystr(path)
            if key not in old:
                return u
            name = path[-2].key
            new[key] = _new_mask(cfg, step, w + u, old[key], WEIGHTS[name][1])
            return jnp.where(new[key], u, -w)

        updates = jax.tree_util.tree_map_with_path(prune, updates, params)
        masks = jax.tree_util.tree_map_with_path(
            lambda p, _: new[jax.tree_util.keystr(p)], state["masks"]
        )
        return updates, {"step": step + 1, "masks": masks}

    return optax.chain(tx, optax.GradientTransformation(init, update))


def sparsity(cfg: PruneConfig, params: nnx.State) -> dict[str, jax.Array]:
    """The achieved fraction of zeros: "sparsity/{layer}/{target}" per block (and
    "sparsity/embeddings"), and "sparsity/all" over every target weight (metrics.jsonl)."""
    zeros: dict[str, jax.Array] = {}
    sizes: dict[str, int] = {}

    def add(name: str, count, size: int) -> None:
        zeros[name] = zeros.get(name, 0) + count
        sizes[name] = sizes.get(name, 0) + size

    for key, (variable, target, _) in targets(cfg, params).items():
        w = variable[...]
        is_zero = (w == 0).astype(jnp.float32)
        add("all", jnp.sum(is_zero), w.size)
        layer = re.match(r"\['blocks'\]\[(\d+)\]", key)
        if target == "embeddings":
            add("embeddings", jnp.sum(is_zero), w.size)
        elif layer:
            add(f"{layer[1]}/{target}", jnp.sum(is_zero), w.size)
        else:  # scanned layers: stacked along a leading axis
            per_layer = jnp.sum(is_zero.reshape(w.shape[0], -1), axis=1)
            for i in range(w.shape[0]):
                add(f"{i}/{target}", per_layer[i], w.size // w.shape[0])
    return {f"sparsity/{name}": zeros[name] / sizes[name] for name in zeros}
