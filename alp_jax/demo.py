"""The CPU demo: train a baseline and an ALP model on digits, attack both, compare.

    python -m alp_jax.demo --output_dir=demo_out

Trains the shipped configs ``digits_baseline`` and ``digits_alp`` (``alp_jax.configs``:
small ResNet-v2, scikit-learn's digits at 16x16; no download) and compares them with
``alp_jax.comparison.train_and_compare``, which writes ``results.csv``, ``results.json``
and ``results.png`` (bar chart) under the output directory; prints the table.
Re-running resumes or reuses finished runs of the same settings; another --compute_dtype
trains into its own directories (e.g. ``alp_bfloat16``).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from alp_jax import cli, comparison, configs

FLAGS = flags.FLAGS
RUNS = (("baseline", "digits_baseline"), ("alp", "digits_alp"))
ATTACKS = ("clean", "pgdll_16_2_10", "pgd_16_2_20")


def run_demo(output_dir: str, *, max_steps: int | None = None,
             attacks: tuple[str, ...] = ATTACKS, compute_dtype: str | None = None
             ) -> list[dict]:
    """The demo's two configs with the overrides, compared under ``attacks``.

    ``compute_dtype`` (e.g. ``"bfloat16"``) overrides the configs' compute dtype for
    training, attacks and evaluation alike; parameters and losses stay float32.
    """
    runs = {}
    for name, config_name in RUNS:
        cfg = configs.get_config(config_name)
        if max_steps is not None:
            cfg.max_steps = max_steps
        if compute_dtype is not None:
            cfg.compute_dtype = compute_dtype
        # One directory per compute dtype: a re-run in another dtype is another run (it
        # would be refused as a resume with a changed config), not a reuse of the old one.
        run_name = name if cfg.compute_dtype == "float32" else f"{name}_{cfg.compute_dtype}"
        cfg.output_dir = os.path.join(output_dir, run_name)
        runs[name] = cfg
    return comparison.train_and_compare(runs, output_dir, attacks)


def main(argv: list[str]) -> None:
    del argv
    cli.setup_logging()
    attacks = tuple(a.strip() for a in FLAGS.attacks.split(",") if a.strip())
    t0 = time.time()
    rows = run_demo(FLAGS.output_dir, max_steps=FLAGS.max_steps, attacks=attacks,
                    compute_dtype=FLAGS.compute_dtype)
    table = comparison.format_table(rows, attacks)
    print(f"\nDigits demo ({rows[0]['examples']} validation examples, "
          f"{rows[0]['compute_dtype']} compute, "
          f"{time.time() - t0:.0f}s in all):\n{table}\n")
    print(f"Wrote results.csv, results.json and results.png to {FLAGS.output_dir}")


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", "demo_out", "Where runs and results go.")
    flags.DEFINE_integer("max_steps", None, "Override the configs' training steps.")
    flags.DEFINE_string("attacks", ",".join(ATTACKS),
                        "Comma-separated attack specs to evaluate.")
    flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                      "Override the configs' compute dtype (parameters stay float32).")
    app.run(main)
