"""CPU demo: clean logit pairing (ALP paper, Sec. 4.2) on scikit-learn's digits.

    python -m alp_jax.train --config=configs/digits_clp.py --output_dir=/tmp/digits_clp

Same as digits_baseline (clean images only) plus 0.5 * the mean squared difference of the
logits of random pairs of clean examples.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from digits_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_objective = "clp"
    c.objective_weight = 0.5
    return c
