"""Preference optimization (config.post_training.format="preference"): DPO, IPO and SimPO.

A batch holds B pairs, "chosen_<key>" and "rejected_<key>" for each packed key ([B, L], the
prompt weighted 0; data.sft), and "reference": the frozen reference model's state, an input of
the same jitted step that is never differentiated. The reference is the init_from checkpoint
(`load_reference`). With LoRA (config.lora.rank > 0) batches carry no reference: it is the
policy itself with its adapters off (llm.model.lora.disabled), i.e. the frozen base, so no second
model is held, and only the adapters are trained (dropout masks as in llm.training.step).

With log-probabilities summed over response tokens, pi (policy) and ref, of chosen c and rejected
r, and |c|, |r| their response lengths:
    dpo:    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))             (Rafailov et al.)
    ipo:    (((pi_c - ref_c) / |c| - (pi_r - ref_r) / |r|) - 1 / (2 beta))^2     (Azar et al.)
    simpo:  -log sigmoid(beta * (pi_c / |c| - pi_r / |r|) - gamma)              (Meng et al.)
Rewards are beta times the bracketed terms of each side (SimPO: beta * pi / |.|); accuracy is the
fraction of pairs whose chosen reward is higher; kl_to_ref is the mean over response tokens of the
KL divergence of the policy's next-token distribution from the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llm.model import lora
from llm.parallel import partitioning
from llm.training import init_from
from llm.training.state import Batch, TrainState

LOSSES = ("dpo", "ipo", "simpo")
SIDES = ("chosen", "rejected")
SUMS = ("loss", "reward_margin", "accuracy", "chosen_logp", "rejected_logp", "kl_to_ref")


def _side(batch: Batch, key: str) -> jax.Array:
    """[2B, L]: the chosen rows, then the rejected rows."""
    return jnp.concatenate([batch[f"{side}_{key}"] for side in SIDES])


def _log_softmax(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> jax.Array:
    """[2B, L, V] float32 next-token log-probabilities of both sides."""
    model = nnx.merge(graphdef, state)
    logits = model(_side(batch, "inputs"), _side(batch, "positions"), _side(batch, "segment_ids"))
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def sequence_logprobs(log_probs: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """[N] summed log-probabilities of the weighted targets; log_probs [N, L, V], targets and
    weights [N, L]."""
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [N, L]
    return jnp.sum(picked * weights, axis=-1)


def reference_logprobs(
    graphdef: nnx.GraphDef, reference: nnx.State, batch: Batch
) -> tuple[jax.Array, jax.Array]:
    """The reference model's [2B] sequence log-probabilities and [2B, L, V] log-softmax, without
    gradients. `reference` is any model state for `graphdef`: the starting checkpoint by default;
    with LoRA, the base parameters without adapters."""
    log_probs = jax.lax.stop_gradient(_log_softmax(graphdef, reference, batch))
    return sequence_logprobs(log_probs, _side(batch, "targets"), _side(batch, "weights")), log_probs


def _reference(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch):
    """`reference_logprobs` of the batch's "reference", or without one (LoRA) of `state` with
    its adapters off."""
    if "reference" in batch:
        return reference_logprobs(graphdef, batch["reference"], batch)
    with lora.disabled():
        return reference_logprobs(graphdef, state, batch)


def preference_losses(
    policy: jax.Array,
    reference: jax.Array,
    lengths: jax.Array,
    *,
    loss: str,
    beta: float,
    gamma: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair losses and chosen and rejected rewards, each [B], of the formulas above; policy,
    reference and lengths are [2, B] (chosen, rejected) summed log-probs and response lengths."""
    if loss == "simpo":
        rewards = beta * policy / lengths
        return -jax.nn.log_sigmoid(rewards[0] - rewards[1] - gamma), rewards[0], rewards[1]
    ratios = policy - reference
    if loss == "ipo":
        ratios = ratios / lengths
        return (ratios[0] - ratios[1] - 1 / (2 * beta)) ** 2, beta * ratios[0], beta * ratios[1]
    rewards = beta * ratios
    return -jax.nn.log_sigmoid(rewards[0] - rewards[1]), rewards[0], rewards[1]


def pair_sums(graphdef, state, batch: Batch, cfg) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The summed loss of the batch's pairs and the sums of SUMS (over pairs; kl_to_ref over
    response tokens, with the token count as "tokens"). Without a "reference" in `batch` the
    reference is `state` with its LoRA adapters off."""
    ref_logp, ref_log_probs = _reference(graphdef, state, batch)
    log_probs = _log_softmax(graphdef, state, batch)  # [2B, L, V]
    targets, weights = _side(batch, "targets"), _side(batch, "weights")
    logp = sequence_logprobs(log_probs, targets, weights)  # [2B]
    pairs = logp.shape[0] // 2
    losses, chosen, rejected = preference_losses(
        logp.reshape(2, pairs),
        ref_logp.reshape(2, pairs),
        jnp.maximum(jnp.sum(weights, axis=-1), 1.0).reshape(2, pairs),
        loss=cfg.loss,
        beta=cfg.beta,
        gamma=cfg.simpo_gamma,
    )
    kl = jnp.sum(jnp.exp(log_probs) * (log_probs - ref_log_probs), axis=-1)  # [2B, L]
    sums = {
        "loss": jnp.sum(losses),
        "reward_margin": jnp.sum(chosen - rejected),
        "accuracy": jnp.sum((chosen > rejected).astype(jnp.float32)),
        "chosen_logp": jnp.sum(logp[:pairs]),
        "rejected_logp": jnp.sum(logp[pairs:]),
        "kl_to_ref": jax.lax.stop_gradient(jnp.sum(kl * weights)),
        "tokens": jnp.sum(weights),
    }
    return sums["loss"], sums


def _means(sums: dict[str, jax.Array], pairs) -> dict[str, jax.Array]:
    out = {k: sums[k] / pairs for k in SUMS if k != "kl_to_ref"}
    return {**out, "kl_to_ref": sums["kl_to_ref"] / jnp.maximum(sums["tokens"], 1.0)}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    exp,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer step on the mean preference loss of the batch's pairs (the experiment's
    post_training config), over its grad_accum_steps micro-batches; metrics dpo/<SUMS>. Only
    `lora.trainable(exp.lora)` variables are differentiated (LoRA: the adapters)."""
    cfg, grad_accum_steps = exp.post_training, exp.grad_accum_steps
    trainable = lora.trainable(exp.lora)
    value_and_grad = jax.value_and_grad(
        lambda params, rest, batch: pair_sums(graphdef, nnx.merge_state(params, rest), batch, cfg),
        has_aux=True,
    )

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, rest = nnx.split_state(state.params, trainable, ...)
        reference = {k: v for k, v in batch.items() if k == "reference"}  # none with LoRA
        arrays = {k: v for k, v in batch.items() if k != "reference"}
        pairs = arrays["chosen_inputs"].shape[0]

        def grad_fn(params, rest, batch, micro=0):
            key = None
            if exp.lora.dropout:
                key = jax.random.fold_in(jax.random.key(exp.seed), state.step)
                key = jax.random.fold_in(key, micro)
            with lora.dropout_key(key):
                return value_and_grad(params, rest, batch)

        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(params, rest, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
                arrays,
            )

            def accumulate(carry, micro_batch):
                micro_batch, i = micro_batch
                (_, sums), g = grad_fn(params, rest, {**micro_batch, **reference}, i)
                return jax.tree.map(jnp.add, carry, (g, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            zero_sums = {k: jnp.zeros(()) for k in (*SUMS, "tokens")}
            (grads, sums), _ = jax.lax.scan(
                accumulate, (zeros, zero_sums), (micro, jnp.arange(grad_accum_steps))
            )
        grads = jax.tree.map(lambda g: g / pairs, grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        new_state = state.replace(
            step=state.step + 1, params=nnx.merge_state(params, rest), opt_state=opt_state
        )
        means = _means(sums, pairs)
        metrics = {
            "loss": means["loss"],
            **{f"dpo/{k}": v for k, v in means.items()},
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, cfg) -> Callable[[nnx.State, Batch], dict]:
    """The sums of SUMS (and "tokens", "pairs") over a batch of pairs."""

    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        _, sums = pair_sums(graphdef, params, batch, cfg)
        return {**sums, "pairs": jnp.asarray(batch["chosen_inputs"].shape[0], jnp.float32)}

    return eval_step


def evaluate(eval_step, params, eval_data, exp, put) -> dict[str, float]:
    """eval_dpo/<SUMS>: means over the first `eval_batches` validation batches of pairs."""
    totals: dict[str, float] = {}
    for i in range(exp.eval_batches):
        sums = jax.device_get(eval_step(params, put(eval_data.batch(i, exp.batch_size))))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return {f"eval_dpo/{k}": float(v) for k, v in _means(totals, totals["pairs"]).items()}


def load_reference(exp, state: nnx.State, shardings) -> nnx.State:
    """The frozen reference: the model state of `exp.init_from`, placed like `state`."""
    abstract = partitioning.with_shardings(jax.eval_shape(lambda: state), shardings)
    return init_from.load_params(exp.init_from, abstract)


def loop_parts(exp, setup, put: Callable[[dict], Batch]):
    """What llm.training.loop swaps in for a preference run: `put` whose device batches also carry
    the reference model's state (`load_reference`; none with LoRA: the base is the reference),
    the eval step and `evaluate`."""
    eval_step = jax.jit(make_eval_step(setup.graphdef, exp.post_training))
    if exp.lora.rank:
        return put, eval_step, evaluate
    reference = load_reference(exp, setup.state.params, setup.shardings.params)
    return lambda batch: {**put(batch), "reference": reference}, eval_step, evaluate
