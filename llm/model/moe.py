"""Mixture-of-experts feed-forward layer: a router sends each token to top_k of E SwiGLU experts.

    route:    logits = x @ router [T, E]; scores = softmax (Mixtral) or sigmoid (DeepSeek-V3);
              the top_k scores (+ the loss-free balancing bias, for selection only) pick the
              experts, and their scores renormalized to sum to 1 (norm_topk_prob) are the gate weights.
    dispatch: "dropless" sorts the T*k (token, expert) assignments by expert and runs all experts
              as grouped matmuls (`jax.lax.ragged_dot`); "capacity" copies them into fixed
              buffers [E, C, D], C = ceil(capacity_factor * T * k / E), and drops the overflow.
    combine:  y[t] = sum_j gate[t, j] * expert_{e[t, j]}(x[t]) (+ shared experts, dense).

Capacity rule: assignments claim their expert's slots in token order (flattened [B, L]
position, then the token's j-th choice); an assignment finding its expert's C slots taken is
dropped (it adds 0; the residual stream carries the token on).

Experts live on the "expert" mesh axis: under a mesh each device routes its own tokens and
`jax.lax.all_to_all` sends the assignments to the devices holding their experts and back
(`partitioning.logical_shard_map`). Statistics are averaged over all tokens, so the auxiliary
losses equal one device's; capacity is counted per device's tokens.

Parameters, with the Mixtral names they map to (torch keeps [out, in]):
    router  [D, E]     block_sparse_moe.gate.weight.T
    w_gate  [E, D, F]  block_sparse_moe.experts.{e}.w1.weight.T
    w_up    [E, D, F]  block_sparse_moe.experts.{e}.w3.weight.T
    w_down  [E, F, D]  block_sparse_moe.experts.{e}.w2.weight.T
    shared: an llm.model.layers.MLP of width num_shared_experts * F; expert_bias [E]: ExpertBias state.
    shared_gate [D, 1] (shared_expert_gate): Qwen2-MoE's mlp.shared_expert_gate.weight.T.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model import lora, quant
from llm.model.config import ModelConfig, MoEConfig
from llm.model.layers import MLP, dense, param
from llm.parallel import partitioning
from llm.parallel.partitioning import shard

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
Weights = tuple[
    jax.Array, jax.Array, jax.Array
]  # w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]
Hidden = Callable[[jax.Array], jax.Array]  # applied to the experts' hidden [..., F] (config.quant)


def _same(h: jax.Array) -> jax.Array:
    return h


class ExpertBias(nnx.Variable):
    """Selection bias of auxiliary-loss-free balancing (DeepSeek-V3): the train step updates it,
    checkpoints keep it with the model, the optimizer never sees it."""


def route(x: jax.Array, router: jax.Array, bias: jax.Array, cfg: MoEConfig):
    """x: [T, D] -> expert int32[T, k], gate f32[T, k] (rows sum to 1 under norm_topk_prob),
    this device's statistics."""
    logits = x.astype(jnp.float32) @ router.astype(jnp.float32)  # [T, E]
    if cfg.router == "softmax_topk":
        scores = probs = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    selection = jax.lax.stop_gradient(scores + bias)  # the bias picks experts, never weighs them
    _, expert = jax.lax.top_k(selection, cfg.top_k)  # [T, k]
    gate = jnp.take_along_axis(scores, expert, axis=-1)
    if cfg.norm_topk_prob:
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    counts = jnp.zeros(cfg.num_experts, jnp.float32).at[expert.reshape(-1)].add(1.0)
    stats = {
        "load": counts / expert.size,  # fraction of assignments per expert [E]
        "prob": jnp.mean(probs, axis=0),  # mean routing probability per expert [E]
        "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        "entropy": jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1)),
    }
    return expert, gate, stats


def swiglu_grouped(xs: jax.Array, w: Weights, group_sizes: jax.Array, hidden: Hidden) -> jax.Array:
    """xs: [M, D], rows grouped by expert (group_sizes [E]; rows past their sum give 0) -> [M, D]."""
    w_gate, w_up, w_down = w
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes))
    h = h * jax.lax.ragged_dot(xs, w_up, group_sizes)  # [M, F]
    return jax.lax.ragged_dot(hidden(h), w_down, group_sizes)


def swiglu_buffers(buf: jax.Array, w: Weights, hidden: Hidden) -> jax.Array:
    """buf: [E, C, D] -> [E, C, D], expert e applied to its C slots."""
    w_gate, w_up, w_down = w
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate))
    h = h * jnp.einsum("ecd,edf->ecf", buf, w_up)  # [E, C, F]
    return jnp.einsum("ecf,efd->ecd", hidden(h), w_down)


def _inverse(permutation: jax.Array) -> jax.Array:
    return jnp.zeros_like(permutation).at[permutation].set(jnp.arange(permutation.size))


def _all_to_all(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """x: [n_ep, ...]: chunk p goes to expert-axis device p; returns the chunks received, by sender."""
    return jax.lax.all_to_all(x, axes, split_axis=0, concat_axis=0)


def dropless(x, expert, w: Weights, num_experts: int, ep_axes, n_ep: int, hidden: Hidden):
    """Every assignment computed. x: [T, D], expert: [T, k] -> outputs [T*k, D] in (t, j) order."""
    k = expert.shape[1]
    flat = expert.reshape(-1)  # [A], A = T*k
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]  # [A, D] grouped by expert
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    if n_ep == 1:
        ys = swiglu_grouped(xs, w, sizes, hidden)
    else:
        ys = _exchange_grouped(xs, flat[order], sizes, w, ep_axes, n_ep, hidden)
    return ys[_inverse(order)]


def _exchange_grouped(xs, sorted_expert, sizes, w: Weights, ep_axes, n_ep: int, hidden: Hidden):
    """Dropless over the expert axis: each peer gets a [A, D] buffer (room for every assignment,
    so none is dropped), runs its experts on what it received, and sends the outputs back."""
    a, d = xs.shape
    e_loc = sizes.size // n_ep
    peer_sizes = sizes.reshape(n_ep, e_loc).sum(axis=1)  # assignments for each peer [n_ep]
    peer_start = jnp.cumsum(peer_sizes) - peer_sizes
    slot = jnp.arange(a)
    rows = jnp.minimum(peer_start[:, None] + slot, a - 1)  # [n_ep, A]
    send = jnp.where((slot < peer_sizes[:, None])[..., None], xs[rows], 0)  # [n_ep, A, D]
    recv = _all_to_all(send, ep_axes)  # recv[s]: rows from sender s, grouped by my experts
    recv_sizes = _all_to_all(sizes.reshape(n_ep, e_loc), ep_axes)  # [n_ep, E_loc]
    ends = jnp.cumsum(recv_sizes, axis=1)
    local = jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1)  # [n_ep, A]; E_loc = empty
    order = jnp.argsort(local.reshape(-1), stable=True)
    out = swiglu_grouped(recv.reshape(-1, d)[order], w, recv_sizes.sum(axis=0), hidden)
    back = _all_to_all(out[_inverse(order)].reshape(n_ep, a, d), ep_axes)  # back[p]: from peer p
    peer = sorted_expert // e_loc  # [A]
    return back[peer, slot - peer_start[peer]]


def capacity(x, expert, w: Weights, cfg: MoEConfig, ep_axes, n_ep: int, hidden: Hidden):
    """Fixed buffers; overflow dropped (module docstring). -> outputs [T*k, D], dropped fraction."""
    t, k = expert.shape
    e, d = cfg.num_experts, x.shape[-1]
    c = math.ceil(cfg.capacity_factor * t * k / e)
    flat = expert.reshape(-1)  # [A] in (token, choice) order: the claiming order
    claimed = jnp.cumsum(jax.nn.one_hot(flat, e, dtype=jnp.int32), axis=0)  # [A, E]
    pos = jnp.take_along_axis(claimed, flat[:, None], axis=1)[:, 0] - 1  # slot in its expert
    keep = pos < c
    token = jnp.arange(t * k) // k
    buf = jnp.zeros((e, c, d), x.dtype).at[flat, jnp.where(keep, pos, c)].set(x[token], mode="drop")
    if n_ep == 1:
        out = swiglu_buffers(buf, w, hidden)
    else:  # send expert e's buffer to its device; each device runs its experts on n_ep * C slots
        e_loc = e // n_ep
        recv = _all_to_all(buf.reshape(n_ep, e_loc, c, d), ep_axes)  # [sender, E_loc, C, D]
        out = swiglu_buffers(recv.transpose(1, 0, 2, 3).reshape(e_loc, n_ep * c, d), w, hidden)
        out = out.reshape(e_loc, n_ep, c, d).transpose(1, 0, 2, 3)
        out = _all_to_all(out, ep_axes).reshape(e, c, d)
    ys = jnp.where(keep[:, None], out[flat, jnp.minimum(pos, c - 1)], 0)
    return ys, 1.0 - jnp.mean(keep.astype(jnp.float32))


def moe_ffn(
    x, router, bias, w: Weights, cfg: MoEConfig, dtype, hidden: Hidden = _same
) -> tuple[jax.Array, dict]:
    """x: [B, L, D] -> (routed experts' output [B, L, D], auxiliary values); `hidden` maps the
    experts' hidden activations before w_down (config.quant's fake quantization)."""

    def local(x, router, bias, w_gate, w_up, w_down):
        ep_axes = partitioning.current_mesh_axes("expert")
        mesh = jax.sharding.get_abstract_mesh()
        n_ep = math.prod(mesh.shape[a] for a in ep_axes)
        b, l, d = x.shape
        xt = x.reshape(b * l, d)  # [T, D]
        expert, gate, stats = route(xt, router, bias, cfg)
        weights = tuple(v.astype(dtype) for v in (w_gate, w_up, w_down))
        if cfg.dispatch == "dropless":
            ys = dropless(xt, expert, weights, cfg.num_experts, ep_axes, n_ep, hidden)
            dropped = 0.0
        else:
            ys, dropped = capacity(xt, expert, weights, cfg, ep_axes, n_ep, hidden)
        y = jnp.einsum("tkd,tk->td", ys.reshape(b * l, cfg.top_k, d), gate.astype(dtype))
        stats["dropped"] = jnp.asarray(dropped, jnp.float32)
        # Tokens are split over the batch and sequence axes: statistics of all tokens, as one
        # device would see them.
        token_axes = partitioning.current_mesh_axes("batch") + partitioning.current_mesh_axes("seq")
        if token_axes:
            stats = jax.lax.pmean(stats, token_axes)
        prob = stats.pop("prob")
        aux = {"aux_loss": cfg.num_experts * jnp.sum(stats["load"] * prob), **stats}  # Switch
        return y.reshape(b, l, d), aux

    tokens = ("batch", "seq", None)
    experts = ("expert", None, None)
    aux_names = {"aux_loss": (), "load": (None,), "z_loss": (), "entropy": (), "dropped": ()}
    fn = partitioning.logical_shard_map(
        local,
        in_names=(tokens, (None, None), (None,), experts, experts, experts),
        out_names=(tokens, aux_names),
    )
    return fn(x, router, bias, *w)


class MoE(nnx.Module):
    """x: [B, L, D] -> (y [B, L, D], aux); aux: aux_loss, z_loss, load [E], dropped, entropy,
    bias_drift (mean |expert_bias|)."""

    lora_targets = (
        ("w_gate", "experts"),
        ("w_up", "experts"),
        ("w_down", "experts"),
    )  # llm.model.lora

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        m, d, pdt = cfg.moe, cfg.embed_dim, cfg.param_dtype
        e, f = m.num_experts, m.expert_mlp_dim
        init = nnx.initializers.normal(0.02)
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers))
        self.router = param(rngs, init, (d, e), ("embed", None), pdt)
        self.w_gate = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), pdt)
        self.w_up = param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), pdt)
        self.w_down = param(rngs, out_init, (e, f, d), ("expert", "mlp", "embed"), pdt)
        self.expert_bias = ExpertBias(
            jnp.zeros((e,), jnp.float32), out_sharding=(None,), eager_sharding=False
        )
        shared = None
        if m.num_shared_experts:
            shared = MLP(dataclasses.replace(cfg, mlp_dim=m.num_shared_experts * f), rngs=rngs)
        self.shared = nnx.data(shared)
        gate = param(rngs, init, (d, 1), ("embed", None), pdt) if m.shared_expert_gate else None
        self.shared_gate = nnx.data(gate)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        # config.quant: expert weights dequantized / fake-quantized; their (and the router's) input
        # and their hidden activations fake-quantized
        # config.lora: adapters merged in, QLoRA's base dequantized (llm.model.lora)
        dt = self.cfg.dtype
        weights = tuple(
            lora.merged_weight(self, n, dt) if lora.is_adapted(self, n)
            else quant.trained_weight(self, n, dt)
            for n in EXPERT_WEIGHTS
        )  # fmt: skip
        xq = quant.activation(self, "experts", x)
        bias = self.expert_bias[...]
        hidden = functools.partial(quant.activation, self, "experts")
        y, aux = moe_ffn(xq, self.router[...], bias, weights, self.cfg.moe, self.cfg.dtype, hidden)
        y = shard(y, ("batch", "seq", "embed"))
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:  # one sigmoid gate per token [B, L, 1]
                shared = shared * jax.nn.sigmoid(dense(x, self.shared_gate[...].astype(x.dtype)))
            y = y + shared
        aux["bias_drift"] = jnp.mean(jnp.abs(bias))
        return y, aux

    def update_bias(self, load: jax.Array) -> None:
        """bias_e += rate * sign(mean load - load_e): overloaded experts get picked less.
        load: [E], or [layers, E] with the biases of stacked layers."""
        rate = self.cfg.moe.bias_update_rate
        if rate:
            bias = self.expert_bias[...]
            mean = jnp.mean(load, axis=-1, keepdims=True)
            self.expert_bias[...] = bias + rate * jnp.sign(mean - load)


def weighted_aux_loss(aux: dict[int, dict[str, jax.Array]], cfg: MoEConfig) -> jax.Array:
    """The MoE terms of the training loss (per token), summed over layers."""
    return sum(
        cfg.aux_loss_weight * layer["aux_loss"] + cfg.z_loss_weight * layer["z_loss"]
        for layer in aux.values()
    )


def aux_metrics(aux: dict[int, dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Scalars for metrics.jsonl / TensorBoard: moe/layer_{i}/{name}, load per expert as load_{e}."""
    metrics = {}
    for i, layer in aux.items():
        for name, value in layer.items():
            if name == "load":
                metrics.update({f"moe/layer_{i}/load_{e}": v for e, v in enumerate(value)})
            else:
                metrics[f"moe/layer_{i}/{name}"] = value
    return metrics
