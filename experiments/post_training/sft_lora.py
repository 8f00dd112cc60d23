"""Supervised fine-tuning through LoRA adapters (llm.model.lora, rank 8 on every attention and MLP
projection; the base frozen) on the shipped SFT set, from a pretrained run of
experiments/default.py: experiments/post_training/sft_full.py with adapters.

    python -m llm.train --config=experiments/default.py --workdir=/tmp/default
    python -m llm.train --config=experiments/post_training/sft_lora.py --workdir=/tmp/sft_lora \
        --config.init_from=workdir:/tmp/default
    python -m llm.lora adapters --workdir=/tmp/sft_lora --out=/tmp/sft_lora_peft   # PEFT format
"""

import ml_collections

from experiments.post_training import sft_full


def get_config() -> ml_collections.ConfigDict:
    c = sft_full.get_config()
    c.lora.rank = 8  # adapters of rank 8 on q, k, v, o, gate, up, down
    c.lora.alpha = 16.0  # updates scaled by alpha / rank = 2
    c.optimizer.learning_rate = 1e-3  # adapters start at 0: a higher rate than full fine-tuning's
    return c
