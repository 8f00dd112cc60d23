"""DPO through LoRA adapters (llm.model.lora, rank 8 on every attention and MLP projection): the
policy is the SFT run plus adapters, the frozen reference is the same model with its adapters off
(no second model in memory); experiments/post_training/dpo.py with adapters.

    python -m llm.train --config=experiments/post_training/dpo_lora.py --workdir=/tmp/dpo_lora \
        --config.init_from=workdir:/tmp/sft
"""

import ml_collections

from experiments.post_training import dpo


def get_config() -> ml_collections.ConfigDict:
    c = dpo.get_config()
    c.lora.rank = 8  # adapters of rank 8 on q, k, v, o, gate, up, down; the base is the reference
    c.lora.alpha = 16.0  # updates scaled by alpha / rank = 2
    c.optimizer.learning_rate = 1e-3  # adapters start at 0: a higher rate than full DPO's
    return c
