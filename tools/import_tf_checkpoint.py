"""Imports a TF-slim checkpoint (e.g. a released ALP model) as an Orbax checkpoint.

Usage::

    python tools/import_tf_checkpoint.py \
      --checkpoint=/data/imagenet64_alp025_2018_06_26.ckpt \
      --output_dir=/ckpt/imagenet64_alp025

The model (``resnet_v2_50``, ...) comes from the TF variable scope and the number of
classes from the logits (or ``--num_classes``). The result loads with
``python -m alp_jax.eval --checkpoint_path=OUTPUT_DIR ...`` and as a fine-tuning start
(``--finetune_checkpoint_path=OUTPUT_DIR``). Every TF variable must map onto the model and
every model variable must be filled, with equal shapes; the global step and optimizer
slots are ignored with a note. Needs TensorFlow (``pip install 'alp-jax[tf]'``).
"""

from __future__ import annotations

from absl import app, flags

from alp_jax import checkpoints, tf_checkpoint

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint", None, "TF checkpoint prefix (e.g. model.ckpt-1234), one of "
                    "its files, or a directory holding one.")
flags.DEFINE_string("output_dir", None, "Directory for the Orbax checkpoint (must not hold "
                    "one already); written as OUTPUT_DIR/checkpoints/0.")
flags.DEFINE_integer("num_classes", None, "Number of logits; inferred from the checkpoint's "
                     "logits when omitted (an error if it differs).")
flags.DEFINE_bool("use_moving_averages", False, "Take '<name>/ExponentialMovingAverage' "
                  "values where the checkpoint has them (the released checkpoints have none).")
flags.DEFINE_integer("dataset_image_size", None, "Optional image size to record in the "
                     "checkpoint's meta.")
flags.mark_flags_as_required(["checkpoint", "output_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        step_dir, result = tf_checkpoint.import_tf_checkpoint(
            FLAGS.checkpoint, FLAGS.output_dir, num_classes=FLAGS.num_classes,
            use_moving_averages=FLAGS.use_moving_averages,
            dataset_image_size=FLAGS.dataset_image_size)
    except (ValueError, FileNotFoundError, FileExistsError, checkpoints.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e
    for note in result.notes:
        print(f"note: {note}")
    print(f"Imported {result.model_name} ({result.num_classes} classes) from "
          f"{FLAGS.checkpoint} into {step_dir}")


if __name__ == "__main__":
    app.run(main)
