"""Supervised fine-tuning by QLoRA: experiments/post_training/sft_lora.py with the frozen base held
in NF4 (4-bit NormalFloat, an absmax scale per block of 64; llm.model.lora), adapters in float32.

    python -m llm.train --config=experiments/default.py --workdir=/tmp/default
    python -m llm.train --config=experiments/post_training/sft_qlora.py --workdir=/tmp/sft_qlora \
        --config.init_from=workdir:/tmp/default
"""

import ml_collections

from experiments.post_training import sft_lora


def get_config() -> ml_collections.ConfigDict:
    c = sft_lora.get_config()
    c.lora.quantize = "nf4"  # none | int8 | nf4: the frozen base weights' storage
    return c
