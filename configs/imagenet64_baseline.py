"""ImageNet 64x64, ResNet-v2-50, clean training (the original's defaults).

    python -m alp_jax.train --config=configs/imagenet64_baseline.py \
      --output_dir=/tmp/imagenet64_base --imagenet_data_dir=$IMAGENET_DIR

TF-slim TFRecords (train-*/validation-*) in $IMAGENET_DIR; for TFDS's
imagenet_resized/64x64 add --dataset=imagenet_tfds. ``batch_size`` is per replica as in
the original; scale out with --config.num_replicas=N (global batch 32*N, learning rate
x N), sharded over every device.
"""

from alp_jax.config import default_config


def get_config():
    c = default_config()
    c.model_name = "resnet_v2_50"
    c.dataset = "imagenet"
    c.dataset_image_size = 64
    c.train_adv_method = "clean"
    c.train_lp_weight = 0.0
    return c
