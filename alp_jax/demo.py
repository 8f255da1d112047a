"""The CPU demo: train a baseline and an ALP model on digits, attack both, compare.

    python -m alp_jax.demo --output_dir=demo_out

Uses ``configs/digits_baseline.py`` and ``configs/digits_alp.py`` (small ResNet-v2,
scikit-learn's digits at 16x16; no download). Writes ``results.csv``, ``results.json``
and ``results.png`` (bar chart) under the output directory and prints the table.
Re-running resumes or reuses finished runs of the same settings; another --compute_dtype
trains into its own directories (e.g. ``alp_bfloat16``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

from absl import app, flags, logging

from alp_jax import checkpoints, cli, provenance
from alp_jax.eval import evaluate_specs
from alp_jax.train import model_from_config, resolve_config, train

FLAGS = flags.FLAGS
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RUNS = (("baseline", "digits_baseline.py"), ("alp", "digits_alp.py"))


def load_config_file(path: str):
    """``get_config()`` of a config file given by path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} not found (run from the repository).")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_demo(output_dir: str, *, max_steps: int | None = None,
             attacks: tuple[str, ...] = ("clean", "pgdll_16_2_10", "pgd_16_2_20"),
             config_dir: str = CONFIG_DIR, compute_dtype: str | None = None) -> list[dict]:
    """Trains both runs (or reuses them) and evaluates each under each attack.

    ``compute_dtype`` (e.g. ``"bfloat16"``) overrides the configs' compute dtype for
    training, attacks and evaluation alike; parameters and losses stay float32.
    """
    rows = []
    for name, filename in RUNS:
        cfg = load_config_file(os.path.join(config_dir, filename))
        if max_steps is not None:
            cfg.max_steps = max_steps
        if compute_dtype is not None:
            cfg.compute_dtype = compute_dtype
        # One directory per compute dtype: a re-run in another dtype is another run (it
        # would be refused as a resume with a changed config), not a reuse of the old one.
        run_name = name if cfg.compute_dtype == "float32" else f"{name}_{cfg.compute_dtype}"
        cfg.output_dir = os.path.join(output_dir, run_name)
        t0 = time.time()
        train(cfg)
        train_s = time.time() - t0
        cfg = resolve_config(cfg)
        model = model_from_config(cfg)
        variables = checkpoints.load_variables(cfg.output_dir,
                                               use_ema=cfg.moving_average_decay > 0)
        row = {"model": name, "train_adv_method": cfg.train_adv_method,
               "train_lp_weight": cfg.train_lp_weight, "steps": cfg.max_steps,
               "compute_dtype": cfg.compute_dtype,
               "train_seconds": round(train_s, 1)}
        # One pass of the evaluation engine for every attack (the clean pass shared).
        results = evaluate_specs(model, variables, cfg, list(attacks), progress=False)
        for attack in attacks:
            row[attack] = results[attack]["top1"]
            row["examples"] = results[attack]["count"]
            logging.info("%s %s: top-1 %.4f", name, attack, results[attack]["top1"])
        rows.append(row)
    write_results(output_dir, rows, attacks)
    return rows


def format_table(rows: list[dict], attacks: tuple[str, ...]) -> str:
    head = "| model | " + " | ".join(attacks) + " |"
    sep = "|---|" + "---|" * len(attacks)
    body = ["| " + r["model"] + " | " + " | ".join(f"{100 * r[a]:.1f}%" for a in attacks)
            + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(output_dir: str, rows: list[dict], attacks: tuple[str, ...]) -> None:
    """results.json (``{"provenance", "results": rows}``), results.csv and results.png,
    each written atomically."""
    os.makedirs(output_dir, exist_ok=True)

    def atomic(name: str, write) -> None:
        path = os.path.join(output_dir, name)
        tmp = path + ".tmp"
        write(tmp)
        os.replace(tmp, path)

    def json_out(p):
        with open(p, "w") as f:  # the rows, and which code and devices computed them
            json.dump({"provenance": provenance.record(), "results": rows}, f, indent=2)

    def csv_out(p):
        with open(p, "w") as f:
            f.write("model," + ",".join(attacks) + "\n")
            for r in rows:
                f.write(r["model"] + "," + ",".join(f"{r[a]:.4f}" for a in attacks) + "\n")

    def png_out(p):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(rows)
        x = np.arange(len(attacks))
        for i, r in enumerate(rows):
            bars = ax.bar(x + i * width, [100 * r[a] for a in attacks], width, label=r["model"])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(x + width * (len(rows) - 1) / 2, attacks)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title("digits, small ResNet-v2: clean vs attacked accuracy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(p, format="png", dpi=120)
        plt.close(fig)

    atomic("results.json", json_out)
    atomic("results.csv", csv_out)
    atomic("results.png", png_out)


def main(argv: list[str]) -> None:
    del argv
    cli.setup_logging()
    attacks = tuple(a.strip() for a in FLAGS.attacks.split(",") if a.strip())
    t0 = time.time()
    rows = run_demo(FLAGS.output_dir, max_steps=FLAGS.max_steps, attacks=attacks,
                    compute_dtype=FLAGS.compute_dtype)
    table = format_table(rows, attacks)
    print(f"\nDigits demo ({rows[0]['examples']} validation examples, "
          f"{rows[0]['compute_dtype']} compute, "
          f"{time.time() - t0:.0f}s in all):\n{table}\n")
    print(f"Wrote results.csv, results.json and results.png to {FLAGS.output_dir}")


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", "demo_out", "Where runs and results go.")
    flags.DEFINE_integer("max_steps", None, "Override the configs' training steps.")
    flags.DEFINE_string("attacks", "clean,pgdll_16_2_10,pgd_16_2_20",
                        "Comma-separated attack specs to evaluate.")
    flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"],
                      "Override the configs' compute dtype (parameters stay float32).")
    app.run(main)
