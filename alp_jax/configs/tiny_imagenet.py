"""Tiny ImageNet: fine-tune the last layers of an ImageNet 64x64 model, every objective.

    python -m alp_jax.train --config=tiny_imagenet_baseline \
      --output_dir=/tmp/finetune_base --tiny_imagenet_data_dir=$TINY_IMAGENET_DIR \
      --finetune_checkpoint_path=/tmp/imagenet64_base

The ALP fine-tuning of the original README (pgdll_16_2_10 with logit-pairing weight 0.5),
from the ALP model of ``imagenet64_alp``:

    python -m alp_jax.train --config=tiny_imagenet_alp \
      --output_dir=/tmp/adv_finetune --tiny_imagenet_data_dir=$TINY_IMAGENET_DIR \
      --finetune_checkpoint_path=/tmp/adv_train

Clean logit pairing (weight 0.5) and logit squeezing (weight 0.05), clean images only, and
TRADES (beta 6) with a 10-step KL attack in the 16/255 ball; compare with
tiny_imagenet_alp:

    python -m alp_jax.train --config=tiny_imagenet_clp \
      --output_dir=/tmp/finetune_clp --tiny_imagenet_data_dir=$TINY_IMAGENET_DIR \
      --finetune_checkpoint_path=/tmp/imagenet64_base

and the same with ``tiny_imagenet_lsq`` (``--output_dir=/tmp/finetune_lsq``) and
``tiny_imagenet_trades`` (``--output_dir=/tmp/finetune_trades``). File spelling:
``--config=alp_jax/configs/tiny_imagenet.py:alp``.

In every variant the 1001-class logits are re-initialised for 200 classes, only logits and
postnorm train, and the learning rate is 0.02; the variants swap the objective
(``alp_jax.configs.VARIANTS``).
"""

from alp_jax.config import default_config
from alp_jax.configs import with_variant


def get_config(variant: str = "baseline"):
    c = default_config()
    c.model_name = "resnet_v2_50"
    c.dataset = "tiny_imagenet"
    c.dataset_image_size = 64
    c.learning_rate = 0.02
    c.finetune_exclude_pretrained_scopes = "resnet_v2_50/logits"
    c.finetune_trainable_scopes = "resnet_v2_50/logits,resnet_v2_50/postnorm"
    return with_variant(c, variant)
