"""Preemption: on SIGTERM or SIGINT, finish the current step, save, wait for the commit, exit.

The handler only records the signal, so a signal during compilation, evaluation or a step is
acted on at the next step boundary; a second SIGINT (Ctrl-C twice) stops at once without saving,
as soon as Python runs again (a compilation in progress finishes first). With several processes, every host must stop at the same
step: `jax.experimental.multihost_utils.reached_preemption_sync_point` (fed by JAX's preemption
notifier) decides that instead of the local flag.
"""

from __future__ import annotations

import signal
import types
from typing import Self

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """Records SIGTERM/SIGINT; `should_stop(step)` says whether to save and exit now."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}

    def _record(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal number, the shell's convention for a run ended by a signal."""
        return 128 + (self.signal or signal.SIGTERM)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Preempted(Exception):
    """The run stopped on a signal after committing a checkpoint of `step`."""

    def __init__(self, step: int, exit_status: int):
        super().__init__(
            f"preempted: checkpoint of step {step} committed; rerun the same command to resume."
        )
        self.step, self.exit_status = step, exit_status
