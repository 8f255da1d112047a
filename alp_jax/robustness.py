"""Honest robustness evaluation program: a suite of attacks over a list of eps, the worst
case per example, robustness curves and gradient-masking checks.

    python -m alp_jax.robustness --checkpoint_path=/tmp/digits_alp --output_dir=/tmp/rob \\
      --attacks=pgdll_16_2_10,pgdtrue_16_2_20_r5,apgdce_16_100,apgddlr_16_100,square_16_1000 \\
      --eps=2,4,8,16 --num_examples=-1

Each attack runs at each eps (``grammar.with_eps``). An example counts as robust at an eps
only if it is classified correctly clean AND under every attack of the suite at that eps
(the worst case per example); each attack's own accuracy is plain top-1 on its
adversarial inputs. Every example of the split (or of its first ``--num_examples``)
counts: the last partial batch is padded and masked. Writes ``results.json``,
``results.csv``, ``per_example.npz``, ``robustness_curve.png`` and
``adversarial_examples.png`` to ``--output_dir`` and prints a table and the masking checks.

``--attacks=autoattack`` runs AutoAttack's standard version instead
(``alp_jax.engine.autoattack``: APGD-CE, APGD-T, FAB-T, Square, each on the examples still
robust) at each eps, with the same masking probes, and also writes
``autoattack_eps{E}.json`` (RobustBench-style: eps on the [0, 1] scale, clean and robust
accuracy, the per-attack accuracies in order, the code version); no image grid.

``--attack_modules=my_pkg.my_attacks`` imports each module named and calls its
``register()``, which registers the user's own attack families
(``alp_jax.attacks.register_family``) so that ``--attacks`` and ``--large_eps_attack`` can
name them.

The settings are config fields (``robustness_*``, ``attack_seed``, ``eval_batch_size``,
``num_examples``, ``split_name``; ``alp_jax.config``), built as ``alp_jax.eval`` builds its
config: the checkpoint's recorded config, then the command line. This program only
builds that config and calls ``alp_jax.evaluator.run_robustness``. The engine
(``alp_jax.engine``) shards the batch over every device of every process
(``--coordinator_address``/``--num_processes``/``--process_id`` or ``--multihost``);
process 0 writes.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags

from alp_jax import checkpoints, cli, engine
from alp_jax.errors import ConfigError
from alp_jax.evaluator import run_robustness

# Program flags -> config fields (layered over the checkpoint's recorded config).
FLAG_FIELDS = {
    "attacks": "robustness_attacks", "eps": "robustness_eps",
    "large_eps_attack": "robustness_large_eps_attack", "num_images": "robustness_num_images",
    "num_examples": "num_examples", "split_name": "split_name", "attack_seed": "attack_seed",
    "eval_batch_size": "eval_batch_size",
}
_REQUIRED_WITHOUT_CONFIG = ("dataset", "dataset_image_size", "moving_average_decay")


def define_flags(fv=None) -> None:
    """The shared flags (``cli.define_common_flags``) and this program's."""
    fv = flags.FLAGS if fv is None else fv
    cli.define_common_flags(fv)
    flags.DEFINE_string("checkpoint_path", None, "Checkpoint: output dir, checkpoints dir or "
                        "step dir.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where to write results.{json,csv}, "
                        "per_example.npz and the PNGs.", flag_values=fv)
    flags.DEFINE_string("attacks", None, "Comma-separated attack specs, each run at every "
                        f"--eps (default {','.join(engine.DEFAULT_ATTACKS)}), or "
                        "'autoattack': AutoAttack's standard version, each attack on the "
                        "examples still robust.", flag_values=fv)
    flags.DEFINE_string("eps", None, "Comma-separated eps, integers on the 0..255 scale "
                        "(default 2,4,8,16).", flag_values=fv)
    flags.DEFINE_integer("num_examples", None, "Examples to attack; -1: the whole split "
                         "(every example counts).", flag_values=fv)
    flags.DEFINE_integer("eval_batch_size", None, "Global batch (default: the checkpoint's "
                         "eval_batch_size).", flag_values=fv)
    flags.DEFINE_string("split_name", None, "train or validation.", flag_values=fv)
    flags.DEFINE_integer("attack_seed", None, "Seed of the attacks' per-example randomness.",
                         flag_values=fv)
    flags.DEFINE_string("large_eps_attack", None, "Masking check: this attack must bring "
                        "accuracy to ~0 (default apgdce_128_50).", flag_values=fv)
    flags.DEFINE_integer("num_images", None, "Examples shown in adversarial_examples.png.",
                         flag_values=fv)


def config_from_flags(fv: flags.FlagValues | None = None) -> ml_collections.ConfigDict:
    """The config of a run: the checkpoint's recorded config, then the command line;
    ValueError for a missing required flag."""
    fv = flags.FLAGS if fv is None else fv
    for name in ("checkpoint_path", "output_dir"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required.")
    # The suite's own values fail fast, before any checkpoint is read.
    given, _ = cli.config_from_command_line(cli.base_config(fv), FLAG_FIELDS, fv)
    cli.validate_evaluation_fields(given)
    step_dir = checkpoints.resolve(fv.checkpoint_path)
    meta = checkpoints.read_meta(step_dir)
    if "config" not in meta and fv.config is None:
        missing = [n for n in _REQUIRED_WITHOUT_CONFIG if getattr(fv, n) is None]
        if missing:
            raise ValueError(
                f"Checkpoint {step_dir!r} records no training config; pass "
                f"{' '.join(f'--{m}=...' for m in missing)}.")
    return cli.checkpoint_config(meta, FLAG_FIELDS, fv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    fv = flags.FLAGS
    cli.maybe_initialize_distributed(fv)
    try:
        cli.load_attack_modules(fv)
        cfg = config_from_flags(fv)
        cli.validate_config(cfg, training=False)
    except (ValueError, FileNotFoundError) as e:
        # One line (run_program), not absl's usage text with the message at its end.
        raise ConfigError(str(e)) from None
    run_robustness(cfg, fv.checkpoint_path, fv.output_dir, progress=engine.ProgressBar())


def run() -> None:
    """Console entry point ``alp-robustness``."""
    cli.run_program(main, define_flags, fields=FLAG_FIELDS,
                    defaults_from="the checkpoint's recorded config")


if __name__ == "__main__":
    run()
