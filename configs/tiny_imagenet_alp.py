"""Tiny ImageNet ALP fine-tuning (the original README's fine-tuning example).

    python -m alp_jax.train --config=configs/tiny_imagenet_alp.py \
      --output_dir=/tmp/adv_finetune --tiny_imagenet_data_dir=$TINY_IMAGENET_DIR \
      --finetune_checkpoint_path=/tmp/adv_train

pgdll_16_2_10 with logit-pairing weight 0.5 and learning rate 0.02; logits re-initialised,
only logits and postnorm train.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tiny_imagenet_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_adv_method = "pgdll_16_2_10"
    c.train_lp_weight = 0.5
    return c
