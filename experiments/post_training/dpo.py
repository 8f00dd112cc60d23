"""DPO (Rafailov et al.) on the shipped preference set (data/post_training: chosen = a section's
first paragraph, rejected = its sentences shuffled or another section's paragraph; real text,
artificial task), from the SFT run of experiments/post_training/sft_full.py, which is also the
frozen reference. IPO and SimPO: --config.post_training.loss=ipo|simpo.

    python -m llm.train --config=experiments/post_training/dpo.py --workdir=/tmp/dpo \
        --config.init_from=workdir:/tmp/sft

metrics.jsonl and TensorBoard get dpo/{loss,reward_margin,accuracy,chosen_logp,rejected_logp,
kl_to_ref}, and at each evaluation eval_dpo/* over the validation pairs.
"""

import pathlib

import ml_collections

from experiments import default

DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "post_training"


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.init_from = "workdir:/tmp/sft"  # the policy's start and the frozen reference
    c.steps = 100  # 4 epochs of the 400 pairs
    c.batch_size = 16  # pairs per step
    c.seq_len = 128  # prompt + paragraph of <= 320 characters fits whole
    c.eval_every = 25
    c.eval_batches = 4  # the ~65 validation pairs
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0  # stay near the reference only through beta
    c.sample_prompt = ""
    c.post_training.format = "preference"
    c.post_training.train_file = str(DATA / "preference_train.jsonl")
    c.post_training.eval_file = str(DATA / "preference_validation.jsonl")
    c.post_training.loss = "dpo"
    c.post_training.beta = 0.1
    return c
