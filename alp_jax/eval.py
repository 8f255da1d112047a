"""Evaluation program: ``python -m alp_jax.eval`` (or ``alp-eval``).

Once (``--eval_once`` or ``--checkpoint_path``) or continuously (each new checkpoint in
``--train_dir``, polling every ``--eval_interval_secs`` until training has finished).
Top-1 accuracy and top-5 recall on clean or attacked (``--adv_method``) inputs, with the
moving averages when ``--moving_average_decay`` > 0. Summaries go to
``train_dir/eval_name``; ``--output_file`` appends ``eval_name,top1,top5``.

When the checkpoint was written by ``alp_jax.train`` its recorded config supplies the
model, dataset and image size; the command line overrides it (``cli.checkpoint_config``).
This program only builds that config and calls ``alp_jax.evaluator``; the numbers come
from the evaluation engine (``alp_jax.engine``): sharded over all devices and processes,
attack randomness per example (``attack_seed``); the last partial batch is dropped as in
the original (``eval_drop_remainder=False`` counts every example).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import app, flags

from alp_jax import checkpoints, cli, evaluator

FLAGS = flags.FLAGS
# This program's flags that set config fields of the same name.
EVAL_FIELDS = {n: n for n in ("adv_method", "eval_name", "split_name", "num_examples",
                              "eval_interval_secs")}


def eval_config(meta: dict[str, Any], fv: flags.FlagValues = FLAGS
                ) -> ml_collections.ConfigDict:
    """The config to evaluate a checkpoint with: its recorded ``meta`` config (or the
    ``--config`` file), then the command line."""
    return cli.checkpoint_config(meta, EVAL_FIELDS, fv)


_FLAGS = {
    "train_dir": (flags.DEFINE_string, "Training output directory to evaluate."),
    "checkpoint_path": (flags.DEFINE_string, "One checkpoint (output dir, checkpoints dir or "
                        "step dir) to evaluate once."),
    "output_file": (flags.DEFINE_string, "CSV file to append 'eval_name,top1,top5' to."),
    "eval_name": (flags.DEFINE_string, "Subdirectory of train_dir for eval summaries."),
    "adv_method": (flags.DEFINE_string, "clean or an attack spec, e.g. pgdll_16_2_10."),
    "split_name": (flags.DEFINE_string, "train or validation."),
    "eval_interval_secs": (flags.DEFINE_integer, "Polling interval (continuous mode)."),
    "num_examples": (flags.DEFINE_integer, "Examples to evaluate; -1: the whole split."),
    "trainable_scopes": (flags.DEFINE_string,
                         "Accepted for compatibility with the original; our checkpoints store "
                         "moving averages of every variable, so it is not needed."),
}


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    cli.define_common_flags(fv)
    for name, (define, help_) in _FLAGS.items():
        define(name, None, help_, flag_values=fv)
    flags.DEFINE_bool("eval_once", False, "Evaluate the newest checkpoint once and exit.",
                      flag_values=fv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    if not FLAGS.checkpoint_path and not FLAGS.train_dir:
        raise app.UsageError("Pass --train_dir (continuous or --eval_once) or --checkpoint_path.")
    cli.load_attack_modules()
    cli.maybe_initialize_distributed()
    if FLAGS.checkpoint_path:
        step_dir = checkpoints.resolve(FLAGS.checkpoint_path)
        cfg = eval_config(checkpoints.read_meta(step_dir))
        cli.validate_config(cfg, training=False)
        summary = os.path.join(FLAGS.train_dir, cfg.eval_name) if FLAGS.train_dir else None
        evaluator.evaluate_checkpoint(step_dir, cfg, summary, FLAGS.output_file)
        return
    if not os.path.isdir(FLAGS.train_dir):
        raise FileNotFoundError(f"--train_dir={FLAGS.train_dir!r} is not a directory.")
    interval = eval_config({}).eval_interval_secs
    evaluator.continuous_eval(FLAGS.train_dir, eval_config, interval, FLAGS.eval_once,
                              FLAGS.output_file)


def run() -> None:
    """Console entry point ``alp-eval``."""
    cli.run_program(main, define_flags, fields=EVAL_FIELDS,
                    defaults_from="the checkpoint's recorded config")


if __name__ == "__main__":
    run()
