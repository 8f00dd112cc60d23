"""One MoE run at one budget of the IsoFLOP study, through the same sweep machinery.

    python -m experiments.studies.sweep --sweep=experiments/scaling/moe_small.py \
        --workdir=/tmp/moe_small

The 64-wide study model with its MLP replaced by 4 experts (top-1, each as wide as the dense MLP):
the same active parameters, so the same steps at the same budget; runs.csv's `active_params`
and `flops` count the active experts only (llm.science.flops).
"""

import ml_collections

from experiments.scaling import isoflop_small


def get_config() -> ml_collections.ConfigDict:
    c = isoflop_small.get_config()
    c.budgets = (2e12,)
    c.shapes = (
        {"embed_dim": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 192,
         "moe.num_experts": 4, "moe.top_k": 1, "moe.expert_mlp_dim": 192},
    )  # fmt: skip
    return c
