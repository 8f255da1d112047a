"""CPU demo: TRADES (Zhang et al. 2019) on scikit-learn's digits.

    python -m alp_jax.train --config=configs/digits_trades.py --output_dir=/tmp/digits_trades

Same as digits_baseline; each step crafts examples that maximise KL(clean || adversarial)
with 10 signed steps of 2/255 in the 16/255 ball, and trains on clean cross-entropy +
6 * that KL (TRADES' beta for CIFAR-10).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from digits_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_objective = "trades"
    c.train_adv_method = "pgd_16_2_10"
    c.objective_weight = 6.0
    return c
