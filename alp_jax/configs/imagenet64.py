"""ImageNet 64x64, ResNet-v2-50 (the original's defaults), with every objective variant.

    python -m alp_jax.train --config=imagenet64_baseline \
      --output_dir=/tmp/imagenet64_base --imagenet_data_dir=$IMAGENET_DIR
    python -m alp_jax.train --config=imagenet64_alp \
      --output_dir=/tmp/adv_train --imagenet_data_dir=$IMAGENET_DIR

``imagenet64_alp`` (file spelling ``alp_jax/configs/imagenet64.py:alp``) is the original
README's example: mixed minibatches of clean and pgdll_16_2_10 examples, logit-pairing
weight 0.5 (the weight the original README's command uses). The released ImageNet ALP
checkpoint is named ``imagenet64_alp025``, which suggests it was trained with weight 0.25:
to aim at its row of the results table, add ``--config.train_lp_weight=0.25``.
``imagenet64_clp``, ``imagenet64_lsq`` and ``imagenet64_trades`` swap the objective
(``alp_jax.configs.VARIANTS``).

TF-slim TFRecords (train-*/validation-*) in $IMAGENET_DIR; for TFDS's
imagenet_resized/64x64 add --dataset=imagenet_tfds. ``batch_size`` is per replica as in
the original; scale out with --config.num_replicas=N (global batch 32*N, learning rate
x N), sharded over every device.
"""

from alp_jax.config import default_config
from alp_jax.configs import with_variant


def get_config(variant: str = "baseline"):
    c = default_config()
    c.model_name = "resnet_v2_50"
    c.dataset = "imagenet"
    c.dataset_image_size = 64
    c.train_adv_method = "clean"
    c.train_lp_weight = 0.0
    return with_variant(c, variant)
