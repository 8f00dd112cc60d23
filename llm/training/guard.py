"""Non-finite values and loss spikes: what a train step does when its loss, gradients or new
parameters are not finite, or its loss jumps.

config.nonfinite = "stop": the step records what went non-finite; the loop raises NonFiniteError
    at the next log or save, naming the step, and never saves that state (the last checkpoint is
    the last good one).
config.nonfinite = "skip": the step keeps the old parameters and optimizer state (selected inside
    the jitted step) and counts it in `skipped_steps`.
config.loss_spike.window = W > 0: a loss above mean + sigmas·std of the last W accepted losses is
    skipped the same way. The window lives in the train state, so a resumed run decides alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from llm.errors import check, is_int
from llm.training import checkpoint
from llm.training.state import Batch, TrainState

POLICIES = ("stop", "skip")
LOSS, GRADIENTS, PARAMETERS = 1, 2, 4  # bits of `bad_what`


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss, gradient or parameter under nonfinite="stop"."""


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """config.nonfinite and config.loss_spike, checked when built."""

    nonfinite: str = "stop"  # one of POLICIES
    spike_window: int = 0  # config.loss_spike.window; 0 disables
    spike_sigmas: float = 6.0  # config.loss_spike.sigmas

    def __post_init__(self):
        check(
            self.nonfinite in POLICIES,
            f"config.nonfinite={self.nonfinite!r} is not one of {POLICIES}.",
        )
        window, sigmas = self.spike_window, self.spike_sigmas
        check(
            is_int(window) and window >= 0,
            f"config.loss_spike.window must be an integer >= 0 (0 disables), got {window!r}.",
        )
        check(
            isinstance(sigmas, (int, float)) and sigmas > 0,
            f"config.loss_spike.sigmas must be > 0, got {sigmas!r}: e.g. "
            "--config.loss_spike.sigmas=6.",
        )


def init_guard(cfg: GuardConfig) -> dict[str, jax.Array]:
    """The guard's part of the train state."""
    return {
        "skipped": jnp.zeros((), jnp.int32),  # steps whose update was skipped
        "bad_step": jnp.full((), -1, jnp.int32),  # first step with a non-finite value; -1: none
        "bad_what": jnp.zeros((), jnp.int32),  # LOSS | GRADIENTS | PARAMETERS of that step
        "losses": jnp.zeros((max(cfg.spike_window, 1),), jnp.float32),  # ring buffer
        "num_losses": jnp.zeros((), jnp.int32),  # losses accepted so far
    }


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def guarded(
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict]], cfg: GuardConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`step_fn` (which leaves `guard` as it is) with the checks above, which update `guard`."""
    window, sigmas = cfg.spike_window, cfg.spike_sigmas

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        guard = state.guard
        new, metrics = step_fn(state, batch)
        loss = metrics["loss"]
        what = (
            jnp.where(jnp.isfinite(loss), 0, LOSS)
            | jnp.where(jnp.isfinite(metrics["grad_norm"]), 0, GRADIENTS)
            | jnp.where(_all_finite(new.params), 0, PARAMETERS)
        )
        first_bad = (what != 0) & (guard["bad_step"] < 0)
        skip = (what != 0) if cfg.nonfinite == "skip" else jnp.zeros((), bool)
        if window:
            history = guard["losses"]
            spike = (guard["num_losses"] >= window) & (
                loss > jnp.mean(history) + sigmas * jnp.std(history)
            )
            skip = skip | spike
        accept = (what == 0) & ~skip
        new_guard = {
            "skipped": guard["skipped"] + skip.astype(jnp.int32),
            "bad_step": jnp.where(first_bad, new.step, guard["bad_step"]),
            "bad_what": jnp.where(first_bad, what, guard["bad_what"]),
            "losses": jnp.where(
                accept,
                guard["losses"].at[guard["num_losses"] % max(window, 1)].set(loss),
                guard["losses"],
            ),
            "num_losses": guard["num_losses"] + accept.astype(jnp.int32),
        }
        if cfg.nonfinite == "skip" or window:  # keep the old parameters and optimizer state

            def keep(n, o):
                return jnp.where(skip, o, n)

            new = new.replace(
                params=jax.tree.map(keep, new.params, state.params),
                opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
            )
        metrics = {**metrics, "skipped_steps": new_guard["skipped"]}
        return new.replace(guard=new_guard), metrics

    return step


def raise_if_nonfinite(state: TrainState, manager: ocp.CheckpointManager) -> None:
    """Raises NonFiniteError if a step of `state` went non-finite (nonfinite="stop"), once the
    pending save of an earlier, good state has committed."""
    bad_step, what = (
        int(x) for x in jax.device_get((state.guard["bad_step"], state.guard["bad_what"]))
    )
    if bad_step < 0:
        return
    checkpoint.wait(manager)
    last = manager.latest_step()
    names = [
        n
        for bit, n in ((LOSS, "loss"), (GRADIENTS, "gradients"), (PARAMETERS, "parameters"))
        if what & bit
    ]
    listed = ", ".join(names[:-1]) + " and " * (len(names) > 1) + names[-1]  # "loss and gradients"
    kept = f"step {last} in {manager.directory}" if last is not None else "none"
    raise NonFiniteError(
        f"step {bad_step}: the {listed} went non-finite (config.nonfinite='stop'); "
        f"nothing was saved after it, the last good checkpoint is {kept}. Lower the learning "
        "rate (or raise warmup), or set --config.nonfinite=skip to skip such steps."
    )
