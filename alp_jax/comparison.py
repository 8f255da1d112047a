"""Training several configs and comparing them under a list of attacks (the demo's table).

``train_and_compare`` trains each config (or resumes / reuses its finished run),
evaluates its checkpoint under every attack in one pass of the evaluation engine, and
writes ``results.{json,csv,png}``; ``format_table`` is the Markdown table of the rows.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
from absl import logging

from alp_jax import checkpoints, provenance
from alp_jax.config import resolve_config
from alp_jax.evaluator import evaluate_specs
from alp_jax.model import model_from_config
from alp_jax.trainer import train


def train_and_compare(runs: dict[str, ml_collections.ConfigDict], output_dir: str,
                      attacks: tuple[str, ...]) -> list[dict[str, Any]]:
    """Trains every ``{name: config}`` (each into its own ``output_dir``), evaluates its
    checkpoint (moving averages when the config keeps them) under each attack, writes the
    results to ``output_dir`` and returns one row per run: the attacks' top-1 accuracies,
    the number of examples, the training settings and seconds."""
    rows = []
    for name, cfg in runs.items():
        t0 = time.time()
        train(cfg)
        train_s = time.time() - t0
        cfg = resolve_config(cfg)
        variables = checkpoints.load_variables(cfg.output_dir,
                                               use_ema=cfg.moving_average_decay > 0)
        row: dict[str, Any] = {
            "model": name, "train_objective": cfg.train_objective,
            "train_adv_method": cfg.train_adv_method, "train_lp_weight": cfg.train_lp_weight,
            "steps": cfg.max_steps, "compute_dtype": cfg.compute_dtype,
            "train_seconds": round(train_s, 1)}
        # One pass of the evaluation engine for every attack (the clean pass shared).
        results = evaluate_specs(model_from_config(cfg), variables, cfg, list(attacks),
                                 progress=False)
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


