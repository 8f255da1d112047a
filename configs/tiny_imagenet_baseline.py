"""Tiny ImageNet: fine-tune the last layers of an ImageNet 64x64 model, clean training.

    python -m alp_jax.train --config=configs/tiny_imagenet_baseline.py \
      --output_dir=/tmp/finetune_base --tiny_imagenet_data_dir=$TINY_IMAGENET_DIR \
      --finetune_checkpoint_path=/tmp/imagenet64_base

The 1001-class logits are re-initialised for 200 classes; only logits and postnorm train.
"""

from alp_jax.config import default_config


def get_config():
    c = default_config()
    c.model_name = "resnet_v2_50"
    c.dataset = "tiny_imagenet"
    c.dataset_image_size = 64
    c.learning_rate = 0.02
    c.finetune_exclude_pretrained_scopes = "resnet_v2_50/logits"
    c.finetune_trainable_scopes = "resnet_v2_50/logits,resnet_v2_50/postnorm"
    return c
