"""What a training run prints (process 0 only): a live progress bar on a terminal, a plain line
per log otherwise (a file or a pipe gets no carriage-return updates), and a line per evaluation."""

from __future__ import annotations

import sys

import jax
from tqdm import tqdm


class Console:
    def __init__(self, steps: int, start: int):
        self.steps = steps
        self.active = jax.process_index() == 0
        self.live = self.active and sys.stderr.isatty()
        self.bar = tqdm(
            total=steps, initial=start, desc="train", dynamic_ncols=True, disable=not self.live
        )

    def step(self) -> None:
        self.bar.update(1)

    def log(self, done: int, metrics: dict[str, float]) -> None:
        """The logged step's loss, throughput and MFU; its evaluation, if any, on a line."""
        if not self.active:
            return
        loss, speed = metrics["loss"], metrics["tokens_per_second"]
        mfu = f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a"
        if self.live:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}", mfu=mfu)
        else:
            print(f"step {done}/{self.steps}: loss {loss:.3f}, {speed:,.0f} tokens/s, MFU {mfu}")
        if "eval_loss" in metrics:
            self.print(
                f"step {done}/{self.steps}: eval loss {metrics['eval_loss']:.3f} "
                f"(perplexity {metrics['eval_perplexity']:.1f})"
            )

    def print(self, text: str) -> None:
        """A line that does not break the bar."""
        if self.active:
            self.bar.write(text, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
