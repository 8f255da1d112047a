"""CPU demo: adversarial logit pairing on scikit-learn's digits.

    python -m alp_jax.train --config=configs/digits_alp.py --output_dir=/tmp/digits_alp

Same as digits_baseline, trained on mixed minibatches of clean and pgdll_16_2_10
examples with a logit-pairing weight of 0.5 (the paper's ImageNet recipe).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from digits_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_adv_method = "pgdll_16_2_10"
    c.train_lp_weight = 0.5
    return c
