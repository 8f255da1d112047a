"""CPU demo: logit squeezing (ALP paper, Sec. 4.3) on scikit-learn's digits.

    python -m alp_jax.train --config=configs/digits_lsq.py --output_dir=/tmp/digits_lsq

Same as digits_baseline (clean images only) plus 0.05 * the mean squared logit.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from digits_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_objective = "lsq"
    c.objective_weight = 0.05
    return c
