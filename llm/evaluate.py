"""Evaluate a model: a run's checkpoint on its validation split, as the trainer does, or any of
our models (a run's checkpoint, a Hugging Face directory) on lm-evaluation-harness tasks.

    python -m llm.evaluate --workdir=/tmp/default                 # eval loss, the latest checkpoint
    python -m llm.evaluate --workdir=/tmp/default@200 --batches=32
    python -m llm.evaluate --workdir=/tmp/default --tasks=llm_lab_cloze,llm_lab_perplexity \\
        --limit=100 --out=results.json                            # lm-eval tasks (extra: eval)
    python -m llm.evaluate --hf=/path/to/hf_model --tasks=hellaswag --out=results.json

Eval loss: prints the step's loss and perplexity; `--out=FILE.json` also writes them. Tasks
(llm.harness): prints lm-eval's table; `--out` writes lm-eval's results JSON. The shipped tasks
are llm/harness/tasks/*.yaml; `--include_path=DIR` adds a directory of task YAML.
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
from data.hf_tokenizer import HFTokenizer, load_tokenizer
from llm import config as config_lib
from llm import hf
from llm.errors import check
from llm.parallel import partitioning
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


def harness_model(
    run: str | None = None, hf_dir: str | None = None, *, max_length: int = 0, batch_size: int = 16
):
    """A JaxLM (llm.harness.lm) of a run's checkpoint (`DIR`, `DIR@STEP`; on its training mesh,
    bos before each text, max_length 0: its seq_len) or a Hugging Face directory (with its
    tokenizer and special tokens; max_length 0: the model's max_seq_len)."""
    from llm.harness.lm import JaxLM

    if run:  # as the run trained: its mesh, tokenizer and context, bos before each text
        model, config = load_run(run)
        exp = load_experiment(config)
        mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
        tokenizer, bos_prefix = load_tokenizer(config.data.tokenizer), True
        max_length = max_length or exp.seq_len
    else:  # the default config's mesh; the model's own tokenizer and special tokens
        exp = config_lib.resolve(config_lib.load_config(config_lib.DEFAULT_CONFIG))
        mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
        model = hf.load(hf_dir, mesh=mesh, rules=exp.mesh.rules)
        tokenizer, bos_prefix = HFTokenizer(hf_dir), False
        max_length = max_length or model.cfg.max_seq_len
    return JaxLM(
        model,
        tokenizer,
        mesh=mesh,
        rules=exp.mesh.rules,
        max_length=max_length,
        batch_size=batch_size,
        bos_prefix=bos_prefix,
    )


def run_tasks(f) -> None:
    """--tasks: lm-eval's results of the model on them, printed as a table and written to --out."""
    from llm.harness import run
    from llm.harness.config import split_tasks

    tasks = split_tasks(f.tasks)
    check(f.limit is None or f.limit > 0, f"--limit must be a positive integer, got {f.limit}.")
    manager = run.task_manager(tasks, f.include_path or "")  # names checked before loading
    lm = harness_model(f.workdir, f.hf, max_length=f.max_length, batch_size=f.batch_size)
    results = run.evaluate(lm, tasks, limit=f.limit, manager=manager)
    print(run.format_table(results))
    if f.out:
        from lm_eval.utils import handle_non_serializable

        results.pop("samples", None)
        text = json.dumps(results, indent=2, default=handle_non_serializable)
        pathlib.Path(f.out).write_text(text + "\n")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if bool(f.workdir) == bool(f.hf) or (f.hf and not f.tasks):
        print(
            "error: pass --workdir=DIR[@STEP] (a `python -m llm.train` run), or --hf=DIR (a "
            "Hugging Face model directory with its tokenizer) with --tasks=..., not both.",
            file=sys.stderr,
        )
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
    try:
        if f.tasks:
            run_tasks(f)
            return
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
    flags.DEFINE_string("hf", None, "A Hugging Face model directory (with --tasks).")
    flags.DEFINE_integer("batches", None, "Validation batches (default: the run's eval_batches).")
    flags.DEFINE_string(
        "tasks", None, "Comma-separated lm-eval tasks (llm/harness/tasks, or lm-eval's by name)."
    )
    flags.DEFINE_string("include_path", None, "Another directory of lm-eval task YAML.")
    flags.DEFINE_integer("limit", None, "Documents per task (default: all).")
    flags.DEFINE_integer(
        "max_length", 0, "Longest scored window; 0: seq_len (runs), max_seq_len (HF)."
    )
    flags.DEFINE_integer("batch_size", 16, "Rows per scoring batch.")
    flags.DEFINE_string("out", None, "Also write the result to this JSON file.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
