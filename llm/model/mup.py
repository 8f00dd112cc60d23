"""muP, the maximal update parametrization for Adam (Tensor Programs V, Table 3 and its variant
with an output multiplier): what changes with the width multiplier m = embed_dim / mup_base_width.

Every parameter has a role, from its name (`ROLES`); the table, for Adam:

    role     parameters                          init std x   learning rate x
    input    embed                               1            1
    vector   RMSNorm scales, q/k/v biases        1            1
    hidden   wq wk wv wo, w_gate w_up w_down     1/sqrt(m)    1/m     (variance ∝ 1/fan_in)
             (dense, MoE experts, shared experts)
    output   MoE router, shared-expert gate      1/m          1/m     (variance ∝ 1/fan_in²)
    readout  unembed ("multiplier": logits x 1/m) 1           1
             unembed ("zero")                    0            1/m

and attention scores are scaled by sqrt(mup_base_head_dim) / head_dim instead of 1/sqrt(head_dim).
The factors are relative to sp at the base width, so at m = 1 muP is sp. A tied embedding is
both input and readout: "multiplier" keeps it an input-like parameter in both roles. Every width
(mlp_dim, heads x head_dim, expert_mlp_dim) is taken to scale by m with embed_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flax import nnx

from llm.model.config import ModelConfig

ROLES = {
    "embed": "input",
    "scale": "vector",
    "bq": "vector",
    "bk": "vector",
    "bv": "vector",
    **dict.fromkeys(("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), "hidden"),
    "router": "output",
    "shared_gate": "output",
    "unembed": "readout",
}


def role(name: str) -> str:
    """The muP role of the parameter called `name` (the last key of its path)."""
    if name not in ROLES:
        raise KeyError(f"parameter {name!r} has no muP role: add it to llm.model.mup.ROLES")
    return ROLES[name]


def init_multiplier(cfg: ModelConfig, name: str) -> float:
    """The factor muP multiplies the sp initialization of parameter `name` by (1 under sp)."""
    m = cfg.width_multiplier
    kind = role(name) if cfg.parametrization == "mup" else "input"
    if kind == "readout":
        return 0.0 if cfg.mup_readout == "zero" else 1.0
    return {"hidden": 1 / math.sqrt(m), "output": 1 / m}.get(kind, 1.0)


def lr_multiplier(cfg: ModelConfig, name: str) -> float:
    """The factor muP multiplies the learning rate of parameter `name` by (1 under sp)."""
    m = cfg.width_multiplier
    kind = role(name) if cfg.parametrization == "mup" else "input"
    if kind == "readout":
        return 1 / m if cfg.mup_readout == "zero" else 1.0
    return 1 / m if kind in ("hidden", "output") else 1.0


def logit_multiplier(cfg: ModelConfig) -> float:
    """The factor on the logits: base_width / width under muP's "multiplier" readout, else 1."""
    if cfg.parametrization == "mup" and cfg.mup_readout == "multiplier":
        return 1 / cfg.width_multiplier
    return 1.0


def query_multiplier(cfg: ModelConfig) -> float:
    """The factor on the queries that turns the kernels' 1/sqrt(head_dim) score scale into muP's
    sqrt(mup_base_head_dim) / head_dim (1 under sp)."""
    if cfg.parametrization != "mup":
        return 1.0
    return math.sqrt(cfg.mup_base_head_dim / cfg.head_dim)


def param_name(path: tuple) -> str:
    """The parameter's name in a state path ("wq" of blocks/0/attn/wq/value)."""
    keys = [getattr(k, "key", k) for k in path]
    return next(k for k in reversed(keys) if isinstance(k, str))


def rescale_init(cfg: ModelConfig, model: nnx.Module) -> None:
    """Multiplies each parameter of a freshly built `model` by its `init_multiplier`."""
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            factor = init_multiplier(cfg, param_name(path))
            if factor != 1.0:
                variable[...] = variable[...] * factor


def lr_multipliers(cfg: ModelConfig) -> Callable[[tuple], float] | None:
    """State path -> learning-rate factor for the optimizer (llm.training.optimizer); None under
    sp."""
    if cfg.parametrization != "mup":
        return None
    return lambda path: lr_multiplier(cfg, param_name(path))
