"""Reports of a suite: table rows, markdown, curves, the adversarial-example grid, files."""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

import numpy as np

from alp_jax import provenance
from alp_jax.attacks import grammar
from alp_jax.attacks.grammar import Bounds
from alp_jax.engine.suite import Progress, SuiteResult, save_per_example


def table_rows(result: SuiteResult) -> list[dict[str, Any]]:
    """Rows for CSV / JSON: clean, each (attack, eps), and the worst case per eps."""
    n = result.num_examples
    rows = [{"attack": "clean", "eps": 0, "spec": "clean", "accuracy": result.clean_accuracy,
             "num_correct": int(result.clean_correct.sum()), "num_examples": n,
             "seconds": 0.0}]
    for a in result.attacks:
        for e in result.eps_list:
            s = result.grid[(a, e)]
            rows.append({"attack": a, "eps": e, "spec": s, "accuracy": result.spec_accuracy(s),
                         "num_correct": int(result.correct[s].sum()), "num_examples": n,
                         "seconds": round(result.seconds[s], 2)})
    for e in result.eps_list:
        w = result.worst_correct(e)
        rows.append({"attack": "worst_case", "eps": e, "spec": "worst_case",
                     "accuracy": float(w.mean()), "num_correct": int(w.sum()),
                     "num_examples": n, "seconds": 0.0})
    return rows


def format_table(result: SuiteResult) -> str:
    """A markdown table: attacks by eps, then the worst case."""
    eps = result.eps_list
    pct = lambda a: f"{100 * a:.1f}%"
    lines = ["| attack | " + " | ".join(f"eps {e}" for e in eps) + " |",
             "|---|" + "---|" * len(eps),
             "| clean | " + " | ".join(pct(result.clean_accuracy) for _ in eps) + " |"]
    for a in result.attacks:
        lines.append(f"| `{a}` | " + " | ".join(pct(result.accuracy(a, e)) for e in eps)
                     + " |")
    lines.append("| **worst case** | " + " | ".join(
        f"**{pct(result.worst_accuracy(e))}**" for e in eps) + " |")
    return "\n".join(lines)


def plot_curves(result: SuiteResult, path: str) -> None:
    """Accuracy vs eps per attack and for the worst case (eps 0 = clean)."""
    # A bare Figure, not pyplot: no backend switch or global state in the caller's
    # process (a notebook's inline plots keep working).
    from matplotlib.figure import Figure

    eps = sorted(result.eps_list)
    xs = np.array([0, *eps], float)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    # The worst case first, as a wide grey band with a dashed black centre: an attack that
    # equals it everywhere (common: the strongest one) stays visible on top of it.
    worst = [result.clean_accuracy] + [result.worst_accuracy(e) for e in eps]
    ax.plot(xs, worst, color="0.75", linewidth=7, solid_capstyle="round", zorder=1)
    ax.plot(xs, worst, color="black", linewidth=1.5, linestyle="--", zorder=2,
            label="worst case (per example, over all attacks)")
    # Distinct markers and line styles, and a small horizontal offset per attack, so that
    # attacks with equal accuracies do not hide each other.
    markers, styles = "o^vsDP*Xh<>", ("-", "-.", ":", (0, (5, 1)))
    span = max(xs[-1] - xs[0], 1.0)
    n = len(result.attacks)
    for i, a in enumerate(result.attacks):
        shift = (i - (n - 1) / 2) * 0.008 * span
        ax.plot(xs + shift, [result.clean_accuracy] + [result.accuracy(a, e) for e in eps],
                marker=markers[i % len(markers)], linestyle=styles[i % len(styles)],
                linewidth=1.2, markersize=6, markerfacecolor="none", zorder=3, label=a)
    ax.set_xlabel("eps (0..255 scale, L-inf)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([0, *eps])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Robustness curve ({result.num_examples} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_examples(result: SuiteResult, path: str, bounds: Bounds = (-1.0, 1.0),
                  eps: int | None = None) -> None:
    """Grid: per example (row) the clean image, then per attack at ``eps`` (default: the
    largest) the adversarial image and its perturbation (grey = 0, scaled to +-eps)."""
    # A bare Figure, not pyplot: no backend switch or global state in the caller's
    # process (a notebook's inline plots keep working).
    from matplotlib.figure import Figure

    eps = max(result.eps_list) if eps is None else eps
    attacks = [a for a in result.attacks if not grammar.parse_attack(a).is_clean]
    clean = result.clean_images
    rows, cols = clean.shape[0], 1 + 2 * len(attacks)
    lo, hi = bounds
    show = lambda x: np.clip((x - lo) / (hi - lo), 0, 1).squeeze()
    fig = Figure(figsize=(1.3 * cols, 1.3 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    scale = eps * (hi - lo) / 255.0
    for r in range(rows):
        axes[r, 0].imshow(show(clean[r]), cmap="gray", vmin=0, vmax=1)
        cp = result.clean_predictions
        axes[r, 0].set_ylabel(f"label {result.labels[r]}"
                              + (f", pred {cp[r]}" if cp is not None else ""), fontsize=7)
        for j, a in enumerate(attacks):
            adv = result.adv_images[result.grid[(a, eps)]][r]
            ok = result.correct[result.grid[(a, eps)]][r]
            ax_a, ax_p = axes[r, 1 + 2 * j], axes[r, 2 + 2 * j]
            ax_a.imshow(show(adv), cmap="gray", vmin=0, vmax=1)
            pred = result.adv_predictions.get(result.grid[(a, eps)])
            ax_a.set_xlabel((f"pred {pred[r]}: " if pred is not None else "")
                            + ("robust" if ok else "fooled"), fontsize=6,
                            color="green" if ok else "red")
            ax_p.imshow(np.clip(0.5 + 0.5 * (adv - clean[r]) / scale, 0, 1).squeeze(),
                        cmap="gray", vmin=0, vmax=1)
            # The perturbation's own size, on the same 0..255 scale as eps.
            size = float(np.max(np.abs(adv - clean[r]))) * 255.0 / (hi - lo)
            ax_p.set_xlabel(f"max {size:.1f}/255", fontsize=6)
            if r == 0:
                ax_a.set_title(a, fontsize=6)
                ax_p.set_title(f"perturbation\nblack -{eps}, white +{eps}", fontsize=6)
    axes[0, 0].set_title("clean", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Adversarial examples at eps {eps}/255", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(output_dir: str, result: SuiteResult, checks: list[dict[str, Any]],
                  info: dict[str, Any], bounds: Bounds = (-1.0, 1.0)) -> dict[str, str]:
    """results.json, results.csv, per_example.npz, robustness_curve.png,
    adversarial_examples.png."""
    os.makedirs(output_dir, exist_ok=True)
    rows = table_rows(result)
    paths = {name: os.path.join(output_dir, name) for name in (
        "results.json", "results.csv", "per_example.npz", "robustness_curve.png",
        "adversarial_examples.png")}
    report = dict(info)
    report.setdefault("provenance", provenance.record())  # which code and devices
    report.update({
        "num_examples": result.num_examples, "attacks": list(result.attacks),
        "eps": list(result.eps_list), "clean_accuracy": result.clean_accuracy,
        "worst_case": {str(e): result.worst_accuracy(e) for e in result.eps_list},
        "results": rows,
        "extra_specs": {s: result.spec_accuracy(s) for s in result.correct
                        if s not in result.grid.values()},
        "zero_gradients": {"fraction_of_entries": result.zero_grad_fraction,
                           "fraction_of_examples": result.zero_grad_examples},
        "timings": {"compile_seconds": result.compile_seconds,
                    "attack_seconds": result.seconds,
                    "compile_total": round(sum(result.compile_seconds.values()), 2),
                    "attack_total": round(sum(result.seconds.values()), 2)},
        "masking_checks": checks,
        "masking_checks_passed": all(c["passed"] is not False for c in checks),
        "table_markdown": format_table(result),
    })
    _atomic_write(paths["results.json"], json.dumps(report, indent=2) + "\n")
    with open(paths["results.csv"] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(paths["results.csv"] + ".tmp", paths["results.csv"])
    save_per_example(paths["per_example.npz"], result)
    plot_curves(result, paths["robustness_curve.png"])
    if result.adv_images:
        plot_examples(result, paths["adversarial_examples.png"], bounds)
    else:
        paths.pop("adversarial_examples.png")
    return paths


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class ProgressBar:
    """A one-line progress bar with running clean and worst-case accuracy."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, p: Progress) -> None:
        frac = p.done / p.total if p.total else 0.0
        filled = int(round(self.width * min(frac, 1.0)))
        bar = "#" * filled + "-" * (self.width - filled)
        rate = p.done / max(p.elapsed, 1e-9)
        eta = (p.total - p.done) / rate if p.total and rate > 0 else 0.0
        worst = " ".join(f"{100 * c / p.done:.1f}%@{e}" for e, c in p.worst_correct.items())
        line = (f"[{bar}] {p.done}/{p.total or '?'} | clean {100 * p.clean_correct / p.done:.1f}%"
                f" | worst {worst} | {rate:.2f} ex/s | ETA {eta:.0f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and p.total and p.done >= p.total:
            self.stream.write("\n")
        self.stream.flush()
