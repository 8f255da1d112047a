"""Exports one of our checkpoints as a TF-slim checkpoint (the reverse of the import).

Usage::

    python tools/export_tf_checkpoint.py \
      --checkpoint_path=/runs/alp_tiny --output=/export/alp_tiny/model.ckpt

Writes TF-slim variable names (``resnet_v2_50/block1/...``), so TF code restores the
weights with a plain ``tf.compat.v1.train.Saver`` (e.g. the original ``eval.py`` with
``--moving_average_decay=-1``). Moving averages, when the checkpoint has them, are
written as ``<name>/ExponentialMovingAverage`` (TF's layout), plus ``global_step``.
Needs TensorFlow (``pip install 'alp-jax[tf]'``).
"""

from __future__ import annotations

import os

from absl import app, flags

from alp_jax import checkpoints, tf_checkpoint

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint_path", None, "Our checkpoint: an output directory (latest "
                    "step), its checkpoints/ directory, or a step directory.")
flags.DEFINE_string("output", None, "TF checkpoint prefix to write, e.g. /dir/model.ckpt "
                    "(an existing directory D means D/model.ckpt).")
flags.DEFINE_bool("moving_averages", True, "Also write the moving averages when the "
                  "checkpoint has them.")
flags.DEFINE_integer("global_step", None, "global_step to record; default: the "
                     "checkpoint's step.")
flags.DEFINE_bool("allow_unverified_checkpoint", False, "Export a checkpoint that has no "
                  "checksums (written before they existed), with a warning; otherwise it is "
                  "refused.")
flags.mark_flags_as_required(["checkpoint_path", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    prefix = FLAGS.output
    if os.path.isdir(prefix) or prefix.endswith(os.sep):
        prefix = os.path.join(prefix, "model.ckpt")
    try:
        written = tf_checkpoint.export_tf_checkpoint(
            FLAGS.checkpoint_path, prefix, moving_averages=FLAGS.moving_averages,
            global_step=FLAGS.global_step,
            allow_unverified=FLAGS.allow_unverified_checkpoint)
    except (ValueError, FileNotFoundError, checkpoints.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"Wrote TF checkpoint {written}")


if __name__ == "__main__":
    app.run(main)
