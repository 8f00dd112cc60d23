"""Train a language model: `python -m llm.train --config=FILE --workdir=DIR [--config.a.b=value]`.

  python -m llm.train --config=experiments/default.py --workdir=/tmp/default
  python -m llm.train --config=experiments/default.py --workdir=/tmp/small --config.model.num_layers=2

Rerunning the same command with the same workdir resumes from the latest checkpoint: a batch is
a pure function of (seed, step), so the data order resumes exactly too. The loop itself is
llm.training.loop; this module resolves the config and owns the command's flags.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections
from absl import app, flags, logging

from data import pipeline, sft, text_corpus
from data import tokenizer as tokenizer_lib
from llm import config as config_lib
from llm.errors import ConfigError
from llm.parallel import distributed, partitioning
from llm.training import checkpoint, guard, loop, workdir
from llm.training.preemption import Preempted, PreemptionWatcher

# Mistakes a user can fix; reported as one message and exit status 2, never a traceback.
USER_ERRORS = (
    ConfigError,
    text_corpus.CorpusNotFoundError,
    text_corpus.CorpusNotTextError,
    tokenizer_lib.TokenizerNotFoundError,
    tokenizer_lib.TokenizerLoadError,
    pipeline.DataError,
    sft.RecordError,
    checkpoint.CheckpointMismatchError,
    checkpoint.CheckpointNotFoundError,
    checkpoint.CheckpointCorruptError,
    checkpoint.CheckpointSaveError,
    guard.NonFiniteError,
    partitioning.MeshError,
    PermissionError,
    workdir.WorkdirBusyError,
    workdir.ResumeChangeError,
    workdir.WorkdirWriteError,
)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it has a checkpoint); returns the last metrics.

    On SIGTERM/SIGINT it saves at the next step boundary and raises `Preempted` once committed.
    """
    experiment = config_lib.resolve(config)
    with PreemptionWatcher() as preemption:
        return loop.run(experiment, workdir, preemption)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every step of their work at INFO
    workdir = flags.FLAGS.workdir
    if not workdir:
        sys.exit("error: --workdir is required, e.g. --workdir=/tmp/run1")
    try:
        distributed.initialize()
        metrics = train_and_evaluate(flags.FLAGS.config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        print(
            "interrupted twice: stopped without saving; rerun the same command to resume from "
            "the last committed checkpoint.",
            file=sys.stderr,
        )
        sys.exit(130)
    if "eval_loss" in metrics:
        mfu = (
            f"{metrics['mfu']:.1%}" if "mfu" in metrics else "n/a (no peak FLOP/s for this device)"
        )
        print(
            f"final: loss {metrics['loss']:.3f}, eval loss {metrics['eval_loss']:.3f} "
            f"(perplexity {metrics['eval_perplexity']:.1f}), "
            f"{metrics.get('tokens_per_second_median', metrics['tokens_per_second']):,.0f} "
            "tokens/s (median of the logged intervals), "
            f"{metrics['tflops_per_device'] * 1e3:.1f} GFLOP/s per device, MFU {mfu}",
            flush=True,
        )


if __name__ == "__main__":  # flags only for the command, so other scripts can import this module
    config_lib.define_config_flag()
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    distributed.define_flags()
    app.run(main, flags_parser=config_lib.parse_flags)
