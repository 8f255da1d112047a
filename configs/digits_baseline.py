"""CPU demo: clean training of the small ResNet-v2 on scikit-learn's digits.

    python -m alp_jax.train --config=configs/digits_baseline.py --output_dir=/tmp/digits_base

Digits (8x8, shipped with scikit-learn) are upsampled to 16x16 and scaled to [-1, 1].
"""

from alp_jax.config import default_config


def get_config():
    c = default_config()
    c.dataset = "digits"
    c.dataset_image_size = 16
    c.model_name = "resnet_v2_small"
    c.batch_size = 64
    c.learning_rate = 0.02
    c.lr_num_epochs_per_decay = 4.0
    c.moving_average_decay = 0.999
    c.bn_decay = 0.9  # a few hundred steps: let the BatchNorm statistics settle
    c.max_steps = 400
    c.save_model_steps = 200
    c.save_summaries_steps = 50
    c.log_every_steps = 50
    c.eval_batch_size = 64
    return c
