"""The train state: one typed pytree, defined here and used by the step, the guard, checkpoints
and partitioning."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a checkpoint holds all of it.

    step:      int32[], optimizer steps taken.
    params:    the whole model state (nnx.State): the trained nnx.Param plus untrained state such
               as the MoE expert biases of loss-free balancing (llm.model.moe.ExpertBias); the
               optimizer sees the nnx.Param part only.
    opt_state: the optax state of the nnx.Param part.
    guard:     the non-finite and loss-spike state of llm.training.guard (`init_guard`).
    teacher:   distillation's frozen teacher model state (llm.training.distill), read by the step,
               never written nor checkpointed; None without a teacher.
    """

    step: jax.Array
    params: nnx.State
    opt_state: Any
    guard: dict[str, jax.Array]
    teacher: Any = None


# inputs, targets, segment_ids, positions: int32[B, L]; weights: f32[B, L]
Batch = dict[str, jax.Array]
