"""Evaluate a run's checkpoint on its validation split, as the trainer does, without training.

    python -m llm.evaluate --workdir=/tmp/default                 # the latest checkpoint
    python -m llm.evaluate --workdir=/tmp/default@200 --batches=32

Prints the step's eval loss and perplexity; `--out=FILE.json` also writes them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from data import pipeline, text_corpus
from data import tokenizer as tokenizer_lib
from llm import config as config_lib
from llm.errors import check
from llm.runs import load_experiment, load_run
from llm.training import checkpoint, loop
from llm.training.step import make_eval_step

USER_ERRORS = (
    FileNotFoundError,
    ValueError,
    text_corpus.CorpusNotFoundError,
    tokenizer_lib.TokenizerLoadError,
    pipeline.DataError,
)


def evaluate(run: str, batches: int | None = None) -> dict[str, float]:
    """Eval loss and perplexity of `run` (DIR or DIR@STEP) over its first `batches` validation
    batches (None: the run's eval_batches)."""
    workdir, step = checkpoint.split_step(run)
    model, config = load_run(run)
    if step is None:
        step = checkpoint.make_manager(workdir, async_save=False, create=False).latest_step()
    exp = load_experiment(config)
    if batches is not None:
        check(batches > 0, f"--batches must be a positive integer, got {batches}.")
        exp = dataclasses.replace(exp, eval_batches=batches)
    _, _, eval_data = exp.load_data()
    graphdef, params = nnx.split(model)
    eval_step = jax.jit(make_eval_step(graphdef, exp.loss))
    put = lambda batch: {k: jnp.asarray(v) for k, v in batch.items()}
    return {"step": step, **loop.evaluate(eval_step, params, eval_data, exp, put)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        print("error: pass --workdir=DIR[@STEP], a `python -m llm.train` run.", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
    try:
        result = evaluate(f.workdir, f.batches)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"step {result['step']}: eval loss {result['eval_loss']:.4f} "
        f"(perplexity {result['eval_perplexity']:.2f})"
    )
    if f.out:
        pathlib.Path(f.out).write_text(json.dumps(result, indent=2) + "\n")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training run directory; DIR@STEP for a step.")
    flags.DEFINE_integer("batches", None, "Validation batches (default: the run's eval_batches).")
    flags.DEFINE_string("out", None, "Also write the result to this JSON file.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
