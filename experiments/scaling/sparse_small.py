"""One sliding-window run at one budget of the IsoFLOP study, through the same sweep machinery.

    python -m experiments.studies.sweep --sweep=experiments/scaling/sparse_small.py \
        --workdir=/tmp/sparse_small

The 64-wide study model with a 32-token sliding window in place of dense causal attention;
llm.science.flops counts the attended pairs only, so the run gets more steps for the same budget.
"""

import ml_collections

from experiments.scaling import isoflop_small


def get_config() -> ml_collections.ConfigDict:
    c = isoflop_small.get_config()
    c.budgets = (2e12,)
    c.shapes = (
        {"embed_dim": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 192,
         "attention_pattern": "sliding", "attention_window": 32},
    )  # fmt: skip
    return c
