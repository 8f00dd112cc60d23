"""The pure pieces of training: the loss, and the train and eval steps (jitted by the loop)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llm.model import moe
from llm.training.state import Batch, TrainState


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float
) -> tuple[jax.Array, jax.Array]:
    """Summed weighted next-token loss (+ z_loss·log(Z)²) and summed cross-entropy alone.

    logits: f32[B, L, V]; targets: int32[B, L]; weights: f32[B, L].
    """
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = (log_z - target_logit) * weights
    return jnp.sum(ce + z_loss * jnp.square(log_z) * weights), jnp.sum(ce)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int,
    z_loss: float,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer step over a batch split into `grad_accum_steps` micro-batches.

    MoE models add their weighted auxiliary losses to the loss, report their routing statistics
    (llm.model.moe.aux_metrics) and take one loss-free balancing step of their expert biases.
    """

    def loss_fn(params, rest, batch: Batch):
        model = nnx.merge(graphdef, params, rest)
        logits, moe_aux = model(
            batch["inputs"], batch["positions"], batch["segment_ids"], return_aux=True
        )
        loss_sum, ce_sum = cross_entropy(logits, batch["targets"], batch["weights"], z_loss)
        if moe_aux:  # per-token losses, weighted like the summed cross-entropy
            loss_sum += jnp.sum(batch["weights"]) * moe.weighted_aux_loss(moe_aux, model.cfg.moe)
        return loss_sum, (ce_sum, moe_aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, rest = nnx.split_state(state.params, nnx.Param, ...)
        if grad_accum_steps == 1:
            (_, (ce_sum, moe_aux)), grads = grad_fn(params, rest, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
                batch,
            )

            def accumulate(carry, micro_batch):
                grads, ce_sum = carry
                (_, (ce, aux)), g = grad_fn(params, rest, micro_batch)
                return (jax.tree.map(jnp.add, grads, g), ce_sum + ce), aux

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, ce_sum), moe_aux = jax.lax.scan(accumulate, (zeros, jnp.zeros(())), micro)
            moe_aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), moe_aux)
        num_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        grads = jax.tree.map(lambda g: g / num_tokens, grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        if moe_aux:  # auxiliary-loss-free balancing, from this batch's expert loads
            model = nnx.merge(graphdef, params, rest)
            model.update_expert_biases({i: layer["load"] for i, layer in moe_aux.items()})
            rest = nnx.state(model, nnx.Not(nnx.Param))
        new_state = state.replace(
            step=state.step + 1, params=nnx.merge_state(params, rest), opt_state=opt_state
        )
        metrics = {
            "loss": ce_sum / num_tokens,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            **moe.aux_metrics(moe_aux),
        }
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    """Summed cross-entropy and number of target tokens of a batch."""

    def eval_step(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
        logits = nnx.merge(graphdef, params)(
            batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        _, ce_sum = cross_entropy(logits, batch["targets"], batch["weights"], 0.0)
        return ce_sum, jnp.sum(batch["weights"])

    return eval_step
