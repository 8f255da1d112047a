"""ImageNet 64x64, ResNet-v2-50, adversarial logit pairing (the original README's example).

    python -m alp_jax.train --config=configs/imagenet64_alp.py \
      --output_dir=/tmp/adv_train --imagenet_data_dir=$IMAGENET_DIR

Mixed minibatches of clean and pgdll_16_2_10 examples, logit-pairing weight 0.5 (the
weight the original README's command uses); everything else as imagenet64_baseline.
The released ImageNet ALP checkpoint is named ``imagenet64_alp025``, which suggests it was
trained with weight 0.25: to aim at its row of the results table, add
``--config.train_lp_weight=0.25``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from imagenet64_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_adv_method = "pgdll_16_2_10"
    c.train_lp_weight = 0.5
    return c
