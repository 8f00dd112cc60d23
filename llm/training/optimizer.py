"""The optimizer: AdamW with linear warmup then cosine decay, global-norm clipping, and optional
per-parameter learning-rate multipliers (muP, llm.model.mup)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

from llm.errors import check


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """config.optimizer, checked when built."""

    learning_rate: float = 3e-3
    warmup_steps: int = (
        30  # llm.config.resolve turns None (follow the run's length) into steps // 10
    )
    min_learning_rate_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        check(
            self.learning_rate > 0,
            f"config.optimizer.learning_rate must be > 0, got {self.learning_rate}.",
        )
        check(
            0 <= self.min_learning_rate_ratio <= 1,
            "config.optimizer.min_learning_rate_ratio must be in [0, 1], got "
            f"{self.min_learning_rate_ratio}.",
        )
        check(
            self.grad_clip_norm >= 0,
            "config.optimizer.grad_clip_norm must be >= 0 (0 disables clipping).",
        )

    def check_schedule(self, steps: int) -> None:
        """The warmup ends before the run does."""
        check(
            0 <= self.warmup_steps < steps,
            f"config.optimizer.warmup_steps={self.warmup_steps} must be in [0, steps={steps}).",
        )


def scale_by_multipliers(multiplier: Callable[[tuple], float]) -> optax.GradientTransformation:
    """Each update times `multiplier(its path)`: per-parameter learning rates (weight decay too)."""

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda path, u: u * multiplier(path), updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    opt: OptimizerConfig, steps: int, lr_multiplier: Callable[[tuple], float] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay over `steps`, global-norm clipping; norm scales
    are not decayed. `lr_multiplier` (a parameter's state path -> factor, e.g.
    llm.model.mup.lr_multipliers) scales each parameter's learning rate; None: all 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=steps,
        end_value=opt.learning_rate * opt.min_learning_rate_ratio,
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "scale" not in jax.tree_util.keystr(path), params
        )

    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm)
        if opt.grad_clip_norm > 0
        else optax.identity(),
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
        *([] if lr_multiplier is None else [scale_by_multipliers(lr_multiplier)]),
    )
    return tx, schedule
