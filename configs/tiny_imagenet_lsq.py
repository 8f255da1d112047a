"""Tiny ImageNet fine-tuning with logit squeezing (weight 0.05), clean images only.

    python -m alp_jax.train --config=configs/tiny_imagenet_lsq.py \
      --output_dir=/tmp/finetune_lsq --tiny_imagenet_data_dir=$TINY_IMAGENET_DIR \
      --finetune_checkpoint_path=/tmp/imagenet64_base

As tiny_imagenet_baseline (logits re-initialised, only logits and postnorm train, learning
rate 0.02), with the objective swapped; compare with tiny_imagenet_alp.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from tiny_imagenet_baseline import get_config as _baseline  # noqa: E402


def get_config():
    c = _baseline()
    c.train_objective = "lsq"
    c.objective_weight = 0.05
    return c
