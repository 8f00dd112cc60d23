"""A CPU-sized IsoFLOP sweep: 4 compute budgets x 5 model widths on the shipped corpus.

    python -m experiments.studies.sweep --sweep=experiments/scaling/isoflop_small.py \
        --workdir=/tmp/isoflop_small
    python -m llm.scaling --runs=/tmp/isoflop_small/runs.csv --out=/tmp/isoflop_small/fits

Shape rule: width w in `widths`, depth = max(1, round(w / 64)), heads = w / 16 (head_dim 16, no
GQA), mlp_dim = 3 w.
Every run has the sweep's parametrization and peak learning rate (README "muP": tune on a proxy,
transfer); isoflop_mup.py is this grid under muP.
Each run trains for budget / (FLOPs per token x batch_size x seq_len) steps (llm.science.flops); runs
shorter than `min_steps` are left out. At ~0.06 TFLOP/s on a 2-core CPU a run takes < ~1 minute.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = "experiments/default.py"  # every run is this config plus the overrides below
    c.budgets = (
        1e12,
        2e12,
        4e12,
        8e12,
    )  # training FLOPs per run (llm.science.flops.train_flops_per_token)
    c.widths = (32, 48, 64, 96, 128)
    c.shapes = tuple(
        {"embed_dim": w, "num_layers": max(1, round(w / 64)), "num_heads": w // 16,
         "num_kv_heads": w // 16, "mlp_dim": 3 * w}
        for w in c.widths
    )  # fmt: skip
    c.min_steps = 20
    c.evals_per_run = 4  # evaluated checkpoints per run (approach 1's training curves)
    c.warmup_fraction = 0.1
    c.learning_rate = 3e-3  # peak learning rate of every run (experiments/default.py's)
    c.parametrization = "sp"  # sp | mup (llm.model.mup)
    c.mup_base_width = 64  # mup: the proxy's embed_dim, where learning_rate was tuned
    c.mup_base_head_dim = 16  # mup: the proxy's head_dim (the shape rule keeps head_dim 16)
    # Overrides common to all runs (dotted config fields).
    c.overrides = {
        "batch_size": 8,
        "seq_len": 128,
        "eval_batches": 4,
        "sample_prompt": "",
    }
    return c
