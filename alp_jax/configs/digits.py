"""CPU demo: the small ResNet-v2 on scikit-learn's digits, with every objective variant.

    python -m alp_jax.train --config=digits_baseline --output_dir=/tmp/digits_base
    python -m alp_jax.train --config=digits_alp --output_dir=/tmp/digits_alp
    python -m alp_jax.train --config=digits_clp --output_dir=/tmp/digits_clp
    python -m alp_jax.train --config=digits_lsq --output_dir=/tmp/digits_lsq
    python -m alp_jax.train --config=digits_trades --output_dir=/tmp/digits_trades

(the file spelling of ``digits_alp`` is ``--config=alp_jax/configs/digits.py:alp``; without
``:VARIANT`` it is the baseline). Digits (8x8, shipped with scikit-learn) are upsampled to
16x16 and scaled to [-1, 1]. The variants (clean training, ALP, CLP, LSQ, TRADES) are the
table ``alp_jax.configs.VARIANTS``, described in ``alp_jax/configs/__init__.py``.
"""

from alp_jax.config import default_config
from alp_jax.configs import with_variant


def get_config(variant: str = "baseline"):
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
    return with_variant(c, variant)
