"""Supervised fine-tuning of all parameters on the shipped SFT set (data/post_training: prompt = a
heading of the Python docs, response = its section's first paragraph; real text, artificial task),
starting from a pretrained run of experiments/default.py. The loss is on response tokens only.

    python -m llm.train --config=experiments/default.py --workdir=/tmp/default
    python -m llm.train --config=experiments/post_training/sft_full.py --workdir=/tmp/sft \
        --config.init_from=workdir:/tmp/default
"""

import pathlib

import ml_collections

from experiments import default

DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "post_training"


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.init_from = "workdir:/tmp/default"  # the pretrained run's latest checkpoint
    c.steps = 200  # ~8 epochs of the 400 records at 16 packed rows a step
    c.seq_len = 256  # a record is ~30-120 tokens; several share a row, each whole
    c.eval_every = 50
    c.eval_batches = 4  # the validation split is ~65 records in a few rows
    c.optimizer.learning_rate = 3e-4  # a tenth of pretraining's
    c.optimizer.warmup_steps = 20
    c.sample_prompt = "The list type\n\n"  # a heading, then the template's separator
    c.post_training.format = "sft"
    c.post_training.train_file = str(DATA / "sft_train.jsonl")
    c.post_training.eval_file = str(DATA / "sft_validation.jsonl")
    return c
