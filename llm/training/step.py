"""The pure pieces of training: the loss, and the train and eval steps (jitted by the loop)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kernels.cross_entropy import api as cross_entropy_api
from kernels.cross_entropy.reference import cross_entropy
from llm.errors import check, check_positive
from llm.model import lora, moe
from llm.model.transformer import Transformer
from llm.parallel import pipeline
from llm.training.distill import Distiller
from llm.training.state import Batch, TrainState

LOSS_IMPLS = ("plain", "chunked")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """config.loss: how the output projection and cross-entropy are computed."""

    impl: str = "plain"  # plain: the model's logits | chunked: kernels.cross_entropy, no logits
    vocab_chunk: int = 4096  # chunked: vocabulary columns per tile (a shorter last one if ragged)
    seq_block: int = 256  # chunked: sequence positions per tile (one block if > seq_len)

    def __post_init__(self):
        check(
            self.impl in LOSS_IMPLS,
            f"config.loss.impl must be one of {LOSS_IMPLS}, got {self.impl!r}.",
        )
        check_positive(self.vocab_chunk, "loss.vocab_chunk")
        check_positive(self.seq_block, "loss.seq_block")


def token_losses(
    model: Transformer, batch: Batch, z_loss: float, loss: LossConfig
) -> tuple[jax.Array, jax.Array, dict]:
    """Summed weighted loss (with z_loss), summed cross-entropy and the MoE auxiliary values."""
    inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
    hidden, _, moe_aux = model.hidden_states(*inputs)
    return *hidden_losses(model, hidden, batch, z_loss, loss), moe_aux


def hidden_losses(
    model: Transformer,
    hidden: jax.Array,
    batch: Batch,
    z_loss: float,
    loss: LossConfig,
    one_hot: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Summed weighted loss (with z_loss) and summed cross-entropy of hidden: [B, L, D] (after
    the final norm); one_hot: the plain loss takes the target's logit without a gather (a
    pipeline's last stage, whose logits are split over the vocabulary)."""
    targets, weights = batch["targets"], batch["weights"]
    if loss.impl == "plain":
        return cross_entropy(model.logits(hidden), targets, weights, z_loss, one_hot)
    return cross_entropy_api.linear_cross_entropy(
        hidden,
        model.unembedding(),
        targets,
        weights,
        z_loss=z_loss,
        vocab_chunk=loss.vocab_chunk,
        seq_block=loss.seq_block,
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int,
    z_loss: float,
    loss: LossConfig = LossConfig(),
    distill: Distiller | None = None,
    pipeline_cfg: pipeline.PipelineConfig | None = None,
    trainable: type[nnx.Variable] = nnx.Param,
    dropout_seed: int | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer step over a batch split into `grad_accum_steps` micro-batches.

    Only the `trainable` variables are differentiated and updated (LoRA: the adapters,
    llm.model.lora.trainable); with `dropout_seed` the adapters' dropout masks come from
    (seed, step, micro-batch).

    MoE models add their weighted auxiliary losses to the loss, report their routing statistics
    (llm.model.moe.aux_metrics) and take one loss-free balancing step of their expert biases.
    With `distill` the loss is llm.training.distill's, from `state.teacher` (metric distill_kl).
    """

    def loss_fn(params, rest, batch: Batch, teacher):
        model = nnx.merge(graphdef, params, rest)
        if distill is None:
            (loss_sum, ce_sum, moe_aux), extra = token_losses(model, batch, z_loss, loss), {}
        else:
            loss_sum, ce_sum, moe_aux, extra = distill.losses(model, teacher, batch, z_loss)
        if moe_aux:  # per-token losses, weighted like the summed cross-entropy
            loss_sum += jnp.sum(batch["weights"]) * moe.weighted_aux_loss(moe_aux, model.cfg.moe)
        return loss_sum, (ce_sum, moe_aux, extra)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if pipeline_cfg is not None and pipeline.stages_of(jax.sharding.get_abstract_mesh()) > 1:
        head = functools.partial(hidden_losses, z_loss=z_loss, loss=loss, one_hot=True)
        pipelined = pipeline.make_value_and_grad(graphdef, pipeline_cfg, head)

        def value_and_grad(params, rest, batch: Batch, teacher):  # no teacher with stages
            del teacher
            (value, (ce_sum, moe_aux)), grads = pipelined(params, rest, batch)
            return (value, (ce_sum, moe_aux, {})), grads

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, rest = nnx.split_state(state.params, trainable, ...)

        def grad_fn(params, rest, batch, micro=0):
            key = None
            if dropout_seed is not None:
                key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
                key = jax.random.fold_in(key, micro)
            with lora.dropout_key(key):
                return value_and_grad(params, rest, batch, state.teacher)

        if grad_accum_steps == 1:
            (_, (ce_sum, moe_aux, extra)), grads = grad_fn(params, rest, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
                batch,
            )

            def accumulate(carry, micro_batch):
                micro_batch, i = micro_batch
                (_, (ce, aux, more)), g = grad_fn(params, rest, micro_batch, i)
                return jax.tree.map(jnp.add, carry, (g, ce, more)), aux

            zeros = jax.tree.map(jnp.zeros_like, params)
            extra = {"distill_kl": jnp.zeros(())} if distill else {}
            (grads, ce_sum, extra), moe_aux = jax.lax.scan(
                accumulate,
                (zeros, jnp.zeros(()), extra),
                (micro, jnp.arange(grad_accum_steps)),
            )
            moe_aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), moe_aux)
        num_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        grads = jax.tree.map(lambda g: g / num_tokens, grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        if moe_aux:  # auxiliary-loss-free balancing, from this batch's expert loads
            model = nnx.merge(graphdef, params, rest)
            model.update_expert_biases({i: layer["load"] for i, layer in moe_aux.items()})
            rest = nnx.state(model, nnx.Not(trainable))
        new_state = state.replace(
            step=state.step + 1, params=nnx.merge_state(params, rest), opt_state=opt_state
        )
        metrics = {
            "loss": ce_sum / num_tokens,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            **moe.aux_metrics(moe_aux),
            **{name: value / num_tokens for name, value in extra.items()},
        }
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, loss: LossConfig = LossConfig()
) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    """Summed cross-entropy and number of target tokens of a batch."""

    def eval_step(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
        _, ce_sum, _ = token_losses(nnx.merge(graphdef, params), batch, 0.0, loss)
        return ce_sum, jnp.sum(batch["weights"])

    return eval_step
