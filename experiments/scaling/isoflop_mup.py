"""The IsoFLOP grid of isoflop_small.py under muP, at the learning rate tuned on a width-64 proxy.

    python -m experiments.studies.sweep --sweep=experiments/scaling/isoflop_mup.py \
        --workdir=/tmp/isoflop_mup [--sweep.budgets="(1e12, 2e12, 4e12)"]

1e-2 is the best peak learning rate of the committed transfer study at its base width 64
(experiments/results/mup/transfer); muP carries it to the other widths (m = width / 64). At width
64 a run is the sp run at this learning rate.
"""

import ml_collections

from experiments.scaling import isoflop_small


def get_config() -> ml_collections.ConfigDict:
    c = isoflop_small.get_config()
    c.parametrization = "mup"
    c.mup_base_width = 64
    c.mup_base_head_dim = 16
    c.learning_rate = 1e-2
    return c
