"""Training program: ``python -m alp_jax.train --config=digits_alp`` (or ``alp-train``).

The original's flags still work (``--hparams="train_adv_method=pgdll_16_2_10,
train_lp_weight=0.5" --dataset=imagenet --dataset_image_size=64 --output_dir=...``).
This program only turns its flags into a config (``config_from_flags``) and calls
``alp_jax.trainer.train``, which holds the loop.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags, logging

from alp_jax import checkpoints, cli, run_dir
from alp_jax.trainer import DONE_FILE, train  # noqa: F401  (re-exported: the program's API)

FLAGS = flags.FLAGS


def config_from_flags(fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
    """The training config: the ``--config`` file (or the defaults), then the command
    line (``cli.config_from_command_line``: one precedence for every program)."""
    cfg, _ = cli.config_from_command_line(cli.base_config(fv), {n: n for n in _TRAIN_FLAGS}, fv)
    return cfg


_TRAIN_FLAGS = {
    "output_dir": (flags.DEFINE_string, "Directory for checkpoints and summaries."),
    "max_steps": (flags.DEFINE_integer, "Training steps; -1 trains forever."),
    "finetune_checkpoint_path": (flags.DEFINE_string,
                                 "Checkpoint (directory or step) to fine-tune from."),
    "finetune_exclude_pretrained_scopes": (
        flags.DEFINE_string, "Comma-separated scopes that keep their fresh initialisation."),
    "finetune_trainable_scopes": (flags.DEFINE_string,
                                  "Comma-separated scopes that train (others stay frozen)."),
}


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    cli.define_common_flags(fv)
    for name, (define, help_) in _TRAIN_FLAGS.items():
        define(name, None, help_, flag_values=fv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    cli.load_attack_modules()
    cfg = config_from_flags()
    cli.validate_config(cfg, training=True)  # before anything is written or initialised
    cli.maybe_initialize_distributed()
    try:
        train(cfg)
    except (run_dir.OutputDirInUse, run_dir.OutputDirNotWritable, run_dir.ResumeMismatch,
            checkpoints.CheckpointError, FloatingPointError) as e:
        # One line, then exit at once: after a failed write Orbax still holds pending
        # background writes, which would otherwise print hundreds of lines at shutdown.
        logging.flush()
        sys.stderr.write(f"FATAL: {e}\n")
        sys.stderr.flush()
        os._exit(1)


def run() -> None:
    """Console entry point ``alp-train``."""
    cli.run_program(main, define_flags)


if __name__ == "__main__":
    run()
