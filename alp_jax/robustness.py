"""Honest robustness evaluation: a suite of attacks over a list of eps, the worst case per
example, robustness curves and gradient-masking checks.

    python -m alp_jax.robustness --checkpoint_path=/tmp/digits_alp --output_dir=/tmp/rob \\
      --attacks=pgdll_16_2_10,pgd_16_2_20_r5,apgdce_16_100,apgddlr_16_100,square_16_1000 \\
      --eps=2,4,8,16 --num_examples=320

Each attack runs at each eps (``with_eps`` rewrites the spec). An example counts as
robust at an eps only if it is classified correctly clean AND under every attack of the
suite at that eps (the worst case per example); each attack's own accuracy is plain
top-1 on its adversarial inputs, as ``alp_jax.eval`` reports it. Writes
``results.json``, ``results.csv``, ``robustness_curve.png`` and
``adversarial_examples.png`` to ``--output_dir`` and prints a table and the masking
checks (``masking_checks``), which say in words when a number should not be trusted.

The model, dataset, image size and moving-average setting come from the checkpoint's
recorded config (``alp_jax.train`` writes it); flags override them, and are required
when the checkpoint has no config (e.g. imported weights). One process, one device.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alp_jax import losses, pgd
from alp_jax.pgd import AttackSpec, Bounds

DEFAULT_ATTACKS = ("pgdll_16_2_10", "pgd_16_2_20_r5", "apgdce_16_100", "apgddlr_16_100",
                   "square_16_1000")
DEFAULT_EPS = (2, 4, 8, 16)
BLACK_BOX_METHODS = ("square",)
_STEP_METHODS = ("pgd", "pgdll", "pgdrnd", "pgdcw")  # specs with a STEP field


# ---- specs ------------------------------------------------------------------------------

def with_eps(spec: str | AttackSpec, eps: int) -> AttackSpec:
    """``spec`` at another EPS (an integer on the 0..255 scale).

    For PGD-style specs STEP keeps its ratio to EPS (rounded, at least 1), so that NITER
    steps still cross the ball at every eps: ``with_eps('pgdll_16_2_10', 8)`` is
    ``pgdll_8_1_10``. ``clean`` stays ``clean``; the spec at its own EPS is unchanged.
    """
    spec = pgd.parse_attack(spec)
    if spec.is_clean:
        return spec
    if isinstance(eps, bool) or not isinstance(eps, (int, np.integer)) or not 1 <= eps <= 255:
        raise ValueError(f"eps must be an integer in 1..255 (the 0..255 scale), got {eps!r}.")
    if eps == spec.eps:
        return spec
    if spec.eps == 0:
        raise ValueError(f"Attack {spec.spec!r} has EPS 0: it gives no STEP/EPS ratio to "
                         f"rescale to eps {eps}; give the template at a positive EPS.")
    fields = spec.spec.split("_")
    fields[1] = str(int(eps))
    if spec.method in _STEP_METHODS:
        fields[2] = str(min(255, max(1, math.floor(spec.step * eps / spec.eps + 0.5))))
    return pgd.parse_attack("_".join(fields))


def is_black_box(spec: str | AttackSpec) -> bool:
    """True for attacks that only query the model's outputs (no gradients)."""
    return pgd.parse_attack(spec).method in BLACK_BOX_METHODS


def _template(spec: AttackSpec) -> AttackSpec:
    """The spec with EPS and STEP left open: one compiled attack serves every eps."""
    fields = spec.spec.split("_")
    fields[1] = "EPS"
    if spec.method in _STEP_METHODS:
        fields[2] = "STEP"
    return dataclasses.replace(spec, eps=0.0, step=0.0, spec="_".join(fields))


# ---- evaluation -------------------------------------------------------------------------

LogitsFn = Callable[..., jax.Array]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class SuiteResult:
    """Per-example correctness of every (attack, eps) of a suite, plus the extra specs.

    ``correct`` maps each concrete spec string (e.g. ``pgdll_8_1_10``) to a bool [N]
    array; ``grid[(attack, eps)]`` is the concrete spec of a suite attack at an eps.
    """

    attacks: tuple[str, ...]
    eps_list: tuple[int, ...]
    labels: np.ndarray
    clean_correct: np.ndarray
    correct: dict[str, np.ndarray]
    grid: dict[tuple[str, int], str]
    seconds: dict[str, float]
    zero_grad_fraction: float  # of all input-gradient entries, clean inputs, true labels
    zero_grad_examples: float  # fraction of examples whose input gradient is all zero
    clean_images: np.ndarray  # the first few examples, for the image grid
    adv_images: dict[str, np.ndarray]

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.clean_correct))

    def spec_accuracy(self, spec: str) -> float:
        return float(np.mean(self.correct[spec]))

    def accuracy(self, attack: str, eps: int) -> float:
        return self.spec_accuracy(self.grid[(attack, eps)])

    def worst_correct(self, eps: int) -> np.ndarray:
        """Robust per example: correct clean and under every attack of the suite at eps."""
        out = self.clean_correct.copy()
        for a in self.attacks:
            out &= self.correct[self.grid[(a, eps)]]
        return out

    def worst_accuracy(self, eps: int) -> float:
        return float(np.mean(self.worst_correct(eps)))


@dataclasses.dataclass(frozen=True)
class ModelLogits:
    """``(variables, x) -> model.apply(variables, x, train=False)``, equal for equal models,
    so that evaluating several checkpoints of one model reuses the compiled attacks."""

    model: Any

    def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
        return self.model.apply(variables, x, train=False)


@functools.lru_cache(maxsize=64)
def _attack_fn(logits_fn: LogitsFn, template: AttackSpec, bounds: Bounds, use_vars: bool):
    def run(variables, images, labels, key, eps, step):
        spec = dataclasses.replace(template, eps=eps, step=step)
        f = (lambda x: logits_fn(variables, x)) if use_vars else logits_fn
        adv = pgd.generate_adversarial_examples(f, images, key, spec, bounds, labels=labels)
        return adv, losses.topk_correct(f(adv), labels, 1)

    return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _clean_fn(logits_fn: LogitsFn, use_vars: bool):
    def run(variables, images, labels):
        f = (lambda x: logits_fn(variables, x)) if use_vars else logits_fn
        grad = jax.grad(lambda x: jnp.sum(losses.softmax_cross_entropy(f(x), labels)))(images)
        zero = (grad == 0).reshape(grad.shape[0], -1)
        return (losses.topk_correct(f(images), labels, 1), jnp.sum(zero),
                jnp.sum(jnp.all(zero, axis=-1)))

    return jax.jit(run)


@dataclasses.dataclass
class Progress:
    """What a progress callback sees after each batch."""

    done: int
    total: int | None
    clean_correct: int
    worst_correct: dict[int, int]
    elapsed: float


def evaluate_suite(logits_fn: LogitsFn, batches: Iterable[Batch], attacks: Sequence[str],
                   eps_list: Sequence[int], key: jax.Array, bounds: Bounds = (-1.0, 1.0), *,
                   variables: Any = None, extra_specs: Sequence[str] = (),
                   num_images: int = 8, total: int | None = None,
                   progress: Callable[[Progress], None] | None = None) -> SuiteResult:
    """Runs every attack of ``attacks`` at every eps of ``eps_list`` on every batch.

    ``logits_fn(x)`` (or ``logits_fn(variables, x)`` when ``variables`` is given, which
    keeps large weights out of the compiled programs) gives inference-mode logits.
    ``batches`` yield ``{'images', 'labels'}``. ``extra_specs`` are concrete specs run
    alongside (the masking probes); a spec that occurs twice runs once. Batch i and spec
    s get ``fold_in(fold_in(key, i), crc(s without _rK))``, so a spec's result does not
    depend on what else runs. Each distinct attack is compiled once for all eps (once per
    process for a hashable ``logits_fn`` such as ``ModelLogits``).
    """
    attacks = tuple(pgd.parse_attack(a).spec for a in attacks)
    eps_list = tuple(int(e) for e in eps_list)
    grid = {(a, e): with_eps(a, e).spec for a in attacks for e in eps_list}
    specs = list(dict.fromkeys([*grid.values(), *(pgd.parse_attack(s).spec
                                                  for s in extra_specs)]))
    parsed = {s: pgd.parse_attack(s) for s in specs}
    use_vars = variables is not None
    cached = _is_hashable(logits_fn)
    build = _attack_fn if cached else _attack_fn.__wrapped__
    compiled: dict[AttackSpec, Any] = {}
    clean_fn = (_clean_fn if cached else _clean_fn.__wrapped__)(logits_fn, use_vars)
    labels_all, clean_all = [], []
    correct: dict[str, list[np.ndarray]] = {s: [] for s in specs}
    seconds = dict.fromkeys(specs, 0.0)
    zero_entries = zero_examples = entries = 0
    clean_images: np.ndarray | None = None
    adv_images: dict[str, np.ndarray] = {}
    t0 = time.time()
    done = 0
    worst_running = dict.fromkeys(eps_list, 0)
    for i, batch in enumerate(batches):
        images = jnp.asarray(batch["images"])
        labels = jnp.asarray(batch["labels"])
        clean, zeros, zero_ex = jax.device_get(clean_fn(variables, images, labels))
        clean_all.append(np.asarray(clean, bool))
        labels_all.append(np.asarray(batch["labels"]))
        zero_entries += int(zeros)
        zero_examples += int(zero_ex)
        entries += int(np.prod(images.shape))
        if clean_images is None:
            clean_images = np.asarray(batch["images"][:num_images])
        batch_key = jax.random.fold_in(key, i)
        for s in specs:
            spec = parsed[s]
            if spec.is_clean:
                correct[s].append(clean_all[-1])
                continue
            tmpl = _template(spec)
            if tmpl not in compiled:
                compiled[tmpl] = build(logits_fn, tmpl, tuple(bounds), use_vars)
            attack_fn = compiled[tmpl]
            t = time.time()
            adv, ok = attack_fn(variables, images, labels,
                                jax.random.fold_in(batch_key, _spec_key(s)),
                                jnp.float32(spec.eps), jnp.float32(spec.step))
            ok = np.asarray(jax.device_get(ok), bool)
            seconds[s] += time.time() - t
            correct[s].append(ok)
            if i == 0 and num_images:
                adv_images[s] = np.asarray(adv[:num_images])
        done += images.shape[0]
        for e in eps_list:
            w = clean_all[-1].copy()
            for a in attacks:
                w &= correct[grid[(a, e)]][-1]
            worst_running[e] += int(np.sum(w))
        if progress is not None:
            progress(Progress(done, total, int(sum(np.sum(c) for c in clean_all)),
                              dict(worst_running), time.time() - t0))
    if not labels_all:
        raise ValueError("No examples to evaluate: the data gave no batch (is num_examples "
                         "smaller than the batch size?).")
    return SuiteResult(
        attacks=attacks, eps_list=eps_list, labels=np.concatenate(labels_all),
        clean_correct=np.concatenate(clean_all),
        correct={s: np.concatenate(v) for s, v in correct.items()}, grid=grid,
        seconds=seconds, zero_grad_fraction=zero_entries / max(entries, 1),
        zero_grad_examples=zero_examples / max(done, 1), clean_images=clean_images,
        adv_images=adv_images)


def _is_hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _spec_key(s: str) -> int:
    """A key index per spec, the same for all restart counts (``_rK`` dropped), so that
    ``..._rK`` starts with exactly the run of ``..._r1`` (and ``pgdll_E_S_N_rK`` with
    ``pgdll_E_S_N``) and more restarts can only fool more examples."""
    import zlib

    fields = [f for f in s.split("_") if not (f[:1] == "r" and f[1:].isdigit())]
    return zlib.crc32("_".join(fields).encode()) & 0x7FFFFFFF


# ---- masking checks ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskingProbes:
    """The extra specs the masking checks run (concrete, eps included)."""

    large_eps: str  # should fool (almost) everything
    base: str  # a 1-run PGD ...
    more_iterations: str  # ... the same with more iterations ...
    more_restarts: str  # ... and with more restarts (same key: can only fool more)

    @property
    def specs(self) -> tuple[str, ...]:
        return (self.large_eps, self.base, self.more_iterations, self.more_restarts)


def default_probes(attacks: Sequence[str], *, large_eps_attack: str = "apgdce_128_50",
                   iteration_factor: int = 4, restarts: int = 5) -> MaskingProbes:
    """Probes built from the suite's first multi-run PGD (else ``pgd_16_2_10_rK``).

    ``pgd_16_2_20_r5`` in the suite gives base ``pgd_16_2_20_r1``, more iterations
    ``pgd_16_2_80_r1`` and more restarts ``pgd_16_2_20_r5`` (already computed).
    """
    ref = next((s for s in map(pgd.parse_attack, attacks)
                if s.method in _STEP_METHODS and s.restarts > 1), None)
    if ref is None:
        ref = pgd.parse_attack(f"pgd_16_2_10_r{restarts}")
    fields = ref.spec.split("_")
    r_at = next(i for i, f in enumerate(fields) if f.startswith("r") and i >= 4)
    base = fields.copy()
    base[r_at] = "r1"
    more_iter = base.copy()
    more_iter[3] = str(ref.niter * iteration_factor)
    return MaskingProbes(large_eps=pgd.parse_attack(large_eps_attack).spec,
                         base="_".join(base), more_iterations="_".join(more_iter),
                         more_restarts=ref.spec)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a masking check fails (accuracies as fractions)."""

    large_eps_max_accuracy: float = 0.02
    # A rise smaller than this (or than one example) is put down to chance.
    rise_tolerance: float = 0.005
    # Black box clearly better than every white-box attack: by more than this (and 2 examples).
    black_box_margin: float = 0.03
    max_zero_gradient_fraction: float = 0.5
    max_zero_gradient_examples: float = 0.05


def masking_checks(result: SuiteResult, probes: MaskingProbes | None,
                   thresholds: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    """Signs of gradient masking, each ``{'name', 'passed', 'detail'}``; ``passed`` is None
    when the check could not run (e.g. no black-box attack in the suite)."""
    th = thresholds
    n = result.num_examples
    pct = lambda a: f"{100 * a:.1f}%"
    slack = max(th.rise_tolerance, 1.0 / n)
    checks = []

    def add(name, passed, detail):
        checks.append({"name": name, "passed": passed, "detail": detail})

    if probes is not None:
        acc = result.spec_accuracy(probes.large_eps)
        eps = pgd.parse_attack(probes.large_eps).eps
        ok = acc <= th.large_eps_max_accuracy
        add("large_eps", ok,
            f"{probes.large_eps} (eps {eps}/255 of the pixel range) leaves {pct(acc)} "
            f"accuracy (limit {pct(th.large_eps_max_accuracy)}). " + (
                "An attack this large fools practically everything, as it should." if ok else
                "FAILED: an attack this large should fool practically every example; the "
                "gradients may be masked (or the attack is broken), so the robust accuracies "
                "below may be overstated."))
        for name, other, what in (("more_iterations", probes.more_iterations, "iterations"),
                                  ("more_restarts", probes.more_restarts, "restarts")):
            a0, a1 = result.spec_accuracy(probes.base), result.spec_accuracy(other)
            ok = a1 <= a0 + slack
            add(name, ok,
                f"{probes.base}: {pct(a0)}; {other}: {pct(a1)}. " + (
                    f"More {what} did not raise accuracy." if ok else
                    f"FAILED: more {what} raised accuracy by {pct(a1 - a0)}; a stronger "
                    "attack doing worse points to noisy or masked gradients."))
    rises = []
    for a in (*result.attacks, None):
        accs = [result.worst_accuracy(e) if a is None else result.accuracy(a, e)
                for e in result.eps_list]
        order = np.argsort(result.eps_list)
        for j in range(1, len(order)):
            lo_e, hi_e = result.eps_list[order[j - 1]], result.eps_list[order[j]]
            if accs[order[j]] > accs[order[j - 1]] + slack:
                rises.append(f"{a or 'worst case'}: {pct(accs[order[j - 1]])} at eps {lo_e} "
                             f"-> {pct(accs[order[j]])} at eps {hi_e}")
    if len(result.eps_list) > 1:
        add("monotone_in_eps", not rises,
            "Accuracy never rises with eps." if not rises else
            "FAILED: accuracy rises with a larger eps (" + "; ".join(rises) + "), which a "
            "working attack cannot allow; gradients may be masked.")
    black = [a for a in result.attacks if is_black_box(a)]
    white = [a for a in result.attacks if not is_black_box(a)
             and not pgd.parse_attack(a).is_clean]
    if not black or not white:
        add("black_box", None, "Not run: the suite needs a black-box attack (square_...) "
            "and a white-box one.")
    else:
        bad, notes = [], []
        margin = max(th.black_box_margin, 2.0 / n)
        for e in result.eps_list:
            bb = min(result.accuracy(a, e) for a in black)
            wb = min(result.accuracy(a, e) for a in white)
            white_fooled = np.zeros(n, bool)
            for a in white:
                white_fooled |= ~result.correct[result.grid[(a, e)]]
            only_black = np.zeros(n, bool)
            for a in black:
                only_black |= ~result.correct[result.grid[(a, e)]] & ~white_fooled
            only_black &= result.clean_correct
            notes.append(f"eps {e}: black box {pct(bb)}, best white box {pct(wb)}, "
                         f"{int(only_black.sum())} examples fooled only by the black box")
            if bb < wb - margin:
                bad.append(e)
        add("black_box", not bad,
            "; ".join(notes) + ". " + (
                "The black-box attack does not beat the white-box ones." if not bad else
                f"FAILED at eps {', '.join(map(str, bad))}: the gradient-free attack beats "
                "every gradient-based one by more than "
                f"{pct(margin)}, so the gradients mislead the white-box attacks "
                "(gradient masking); trust the worst case, not the white-box numbers."))
    if probes is not None:
        # A probe at an eps of the suite must not find examples the worst case calls robust.
        missed = []
        for spec in dict.fromkeys(probes.specs):
            e = pgd.parse_attack(spec).eps
            if e in result.eps_list:
                k = int(np.sum(result.worst_correct(e) & ~result.correct[spec]))
                if k:
                    missed.append(f"{spec} fools {k} examples the worst case at eps {e} "
                                  "counts as robust")
        add("suite_covers_probes", not missed,
            "The masking probes found no example the suite's worst case missed." if not missed
            else "FAILED: " + "; ".join(missed) + ". The suite is too weak: its worst case "
            "overstates robustness; add stronger attacks (more iterations or restarts).")
    zf, ze = result.zero_grad_fraction, result.zero_grad_examples
    ok = zf <= th.max_zero_gradient_fraction and ze <= th.max_zero_gradient_examples
    add("zero_gradients", ok,
        f"{pct(zf)} of the input-gradient entries (cross-entropy, clean inputs) are exactly "
        f"zero; {pct(ze)} of the examples have an all-zero gradient. " + (
            "Gradients carry signal." if ok else
            "FAILED: the gradients are (mostly) exactly zero, as behind a non-differentiable "
            "or saturated layer; gradient-based attacks cannot work here and their numbers "
            "overstate robustness."))
    return checks


def format_checks(checks: list[dict[str, Any]]) -> str:
    status = {True: "PASS", False: "FAIL", None: "SKIP"}
    lines = [f"[{status[c['passed']]}] {c['name']}: {c['detail']}" for c in checks]
    failed = [c["name"] for c in checks if c["passed"] is False]
    lines.append("Masking checks: " + (
        f"{len(failed)} FAILED ({', '.join(failed)}); the robust accuracies may be overstated."
        if failed else "all passed."))
    return "\n".join(lines)


# ---- reporting --------------------------------------------------------------------------

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(result.eps_list)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for a in result.attacks:
        ax.plot([0, *eps], [result.clean_accuracy] + [result.accuracy(a, e) for e in eps],
                marker="o", linewidth=1.2, label=a)
    ax.plot([0, *eps], [result.clean_accuracy] + [result.worst_accuracy(e) for e in eps],
            color="black", linewidth=2.5, marker="s", label="worst case")
    ax.set_xlabel("eps (0..255 scale, L-inf)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([0, *eps])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Robustness curve ({result.num_examples} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(result: SuiteResult, path: str, bounds: Bounds = (-1.0, 1.0),
                  eps: int | None = None) -> None:
    """Grid: per example (row) the clean image, then per attack at ``eps`` (default: the
    largest) the adversarial image and its perturbation (grey = 0, scaled to +-eps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = max(result.eps_list) if eps is None else eps
    attacks = [a for a in result.attacks if not pgd.parse_attack(a).is_clean]
    clean = result.clean_images
    rows, cols = clean.shape[0], 1 + 2 * len(attacks)
    lo, hi = bounds
    show = lambda x: np.clip((x - lo) / (hi - lo), 0, 1).squeeze()
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.6), squeeze=False)
    scale = eps * (hi - lo) / 255.0
    for r in range(rows):
        axes[r, 0].imshow(show(clean[r]), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(f"label {result.labels[r]}", fontsize=7)
        for j, a in enumerate(attacks):
            adv = result.adv_images[result.grid[(a, eps)]][r]
            ok = result.correct[result.grid[(a, eps)]][r]
            ax_a, ax_p = axes[r, 1 + 2 * j], axes[r, 2 + 2 * j]
            ax_a.imshow(show(adv), cmap="gray", vmin=0, vmax=1)
            ax_a.set_xlabel("robust" if ok else "fooled", fontsize=6,
                            color="green" if ok else "red")
            ax_p.imshow(np.clip(0.5 + 0.5 * (adv - clean[r]) / scale, 0, 1).squeeze(),
                        cmap="gray", vmin=0, vmax=1)
            if r == 0:
                ax_a.set_title(a, fontsize=6)
                ax_p.set_title("perturbation", fontsize=6)
    axes[0, 0].set_title("clean", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Adversarial examples at eps {eps}/255", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(output_dir: str, result: SuiteResult, checks: list[dict[str, Any]],
                  info: dict[str, Any], bounds: Bounds = (-1.0, 1.0)) -> dict[str, str]:
    """results.json, results.csv, robustness_curve.png, adversarial_examples.png."""
    os.makedirs(output_dir, exist_ok=True)
    rows = table_rows(result)
    paths = {name: os.path.join(output_dir, name) for name in (
        "results.json", "results.csv", "robustness_curve.png", "adversarial_examples.png")}
    report = dict(info)
    report.update({
        "num_examples": result.num_examples, "attacks": list(result.attacks),
        "eps": list(result.eps_list), "clean_accuracy": result.clean_accuracy,
        "worst_case": {str(e): result.worst_accuracy(e) for e in result.eps_list},
        "results": rows,
        "extra_specs": {s: result.spec_accuracy(s) for s in result.correct
                        if s not in result.grid.values()},
        "zero_gradients": {"fraction_of_entries": result.zero_grad_fraction,
                           "fraction_of_examples": result.zero_grad_examples},
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


# ---- program ----------------------------------------------------------------------------

@dataclasses.dataclass
class RunConfig:
    """Everything one robustness run needs (built from flags by ``config_from_flags``)."""

    checkpoint_path: str
    output_dir: str
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[int, ...] = DEFAULT_EPS
    num_examples: int = -1
    batch_size: int | None = None
    split: str = "validation"
    seed: int = 0
    dataset: str | None = None
    dataset_image_size: int | None = None
    moving_average_decay: float | None = None
    model_name: str | None = None
    data_dir: str | None = None
    large_eps_attack: str = "apgdce_128_50"
    num_images: int = 8
    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)


def _resolve_settings(cfg: RunConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Flags over the checkpoint's recorded config; a clear error for what neither gives."""
    recorded = meta.get("config", {}) or {}
    out, missing = {}, []
    for name in ("dataset", "dataset_image_size", "moving_average_decay", "model_name"):
        value = getattr(cfg, name)
        if value is None:
            value = meta.get(name) if name == "model_name" else recorded.get(name)
        if value is None:
            missing.append(f"--{name}")
        out[name] = value
    if missing:
        raise ValueError(
            f"Checkpoint {cfg.checkpoint_path!r} records no {', '.join(m[2:] for m in missing)}"
            f" (no training config in its meta); pass {' '.join(m + '=...' for m in missing)}.")
    from alp_jax import data

    out["num_classes"] = int(meta.get("num_classes") or data.num_classes(out["dataset"]))
    out["bounds"] = tuple(recorded.get("bounds", (-1.0, 1.0)))
    out["compute_dtype"] = recorded.get("compute_dtype", "float32")
    out["batch_size"] = cfg.batch_size or int(recorded.get("eval_batch_size", 50))
    if cfg.data_dir is None and out["dataset"] != "digits":
        key = "tiny_imagenet_data_dir" if out["dataset"] == "tiny_imagenet" \
            else "imagenet_data_dir"
        out["data_dir"] = recorded.get(key) or None
    else:
        out["data_dir"] = cfg.data_dir
    return out


def validate(cfg: RunConfig) -> None:
    """Raises ValueError naming a bad value before anything runs."""
    if not cfg.attacks:
        raise ValueError("--attacks is empty; give at least one attack spec.")
    for a in cfg.attacks:
        pgd.parse_attack(a)
    if not cfg.eps:
        raise ValueError("--eps is empty; give integers on the 0..255 scale, e.g. 2,4,8,16.")
    for e in cfg.eps:
        if not 1 <= e <= 255:
            raise ValueError(f"--eps values must be integers in 1..255, got {e}.")
    if len(set(cfg.eps)) != len(cfg.eps):
        raise ValueError(f"--eps has repeated values: {list(cfg.eps)}.")
    if len(set(cfg.attacks)) != len(cfg.attacks):
        raise ValueError(f"--attacks has repeated specs: {list(cfg.attacks)}.")
    pgd.parse_attack(cfg.large_eps_attack)
    if cfg.num_examples == 0 or cfg.num_examples < -1:
        raise ValueError(f"--num_examples must be positive or -1 (all), got {cfg.num_examples}.")
    if cfg.batch_size is not None and cfg.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {cfg.batch_size}.")
    if not cfg.output_dir:
        raise ValueError("--output_dir is required.")


def run_robustness(cfg: RunConfig, *, log: Callable[[str], None] = print,
                   progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Loads the checkpoint, runs the suite and the masking probes, writes the outputs.

    Returns ``{'result', 'checks', 'paths', 'settings'}``.
    """
    from alp_jax import checkpoints, data
    from alp_jax.model import create_model

    validate(cfg)
    step_dir = checkpoints.resolve(cfg.checkpoint_path)
    meta = checkpoints.read_meta(step_dir)
    st = _resolve_settings(cfg, meta)
    use_ema = st["moving_average_decay"] > 0
    if use_ema:
        raw, _, _ = checkpoints.load_raw(step_dir)
        if raw.get("ema_params") is None:
            raise ValueError(
                f"moving_average_decay={st['moving_average_decay']} asks for moving "
                f"averages, but {step_dir!r} has none; pass --moving_average_decay=-1.")
        del raw
    variables = checkpoints.load_variables(step_dir, use_ema=use_ema)
    model = create_model(st["model_name"], st["num_classes"], dtype=st["compute_dtype"],
                         conv_impl="auto")
    logits_fn = ModelLogits(model)
    batch = st["batch_size"]
    if 0 < cfg.num_examples < batch:
        batch = cfg.num_examples
    batches = list(data.eval_iterator(st["dataset"], st["data_dir"], st["dataset_image_size"],
                                      batch, split=cfg.split, num_examples=cfg.num_examples))
    total = sum(len(b["labels"]) for b in batches)
    probes = default_probes(cfg.attacks, large_eps_attack=cfg.large_eps_attack)
    log(f"Checkpoint {step_dir} ({st['model_name']}, moving averages "
        f"{'on' if use_ema else 'off'}), {st['dataset']} {cfg.split} at "
        f"{st['dataset_image_size']}px: {total} examples in batches of {batch}.")
    log(f"Attacks {', '.join(cfg.attacks)} at eps {', '.join(map(str, cfg.eps))}; "
        f"masking probes {', '.join(probes.specs)}.")
    t0 = time.time()
    result = evaluate_suite(logits_fn, batches, cfg.attacks, cfg.eps,
                            jax.random.PRNGKey(cfg.seed), st["bounds"], variables=variables,
                            extra_specs=probes.specs, num_images=cfg.num_images, total=total,
                            progress=progress)
    checks = masking_checks(result, probes, cfg.thresholds)
    info = {"checkpoint": step_dir, "split": cfg.split, "seed": cfg.seed,
            "seconds": round(time.time() - t0, 1), "probes": dataclasses.asdict(probes),
            **{k: v for k, v in st.items() if k != "data_dir"}}
    info["bounds"] = list(st["bounds"])
    paths = write_outputs(cfg.output_dir, result, checks, info, st["bounds"])
    log(format_table(result))
    log(format_checks(checks))
    log(f"Wrote {', '.join(paths.values())} ({time.time() - t0:.0f}s).")
    return {"result": result, "checks": checks, "paths": paths, "settings": st}


def define_flags(fv=None) -> None:
    from absl import flags

    fv = flags.FLAGS if fv is None else fv
    flags.DEFINE_string("checkpoint_path", None, "Checkpoint: output dir, checkpoints dir or "
                        "step dir.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where to write results.{json,csv} and the PNGs.",
                        flag_values=fv)
    flags.DEFINE_list("attacks", list(DEFAULT_ATTACKS), "Attack specs (each run at every "
                      "--eps; see alp_jax.attacks).", flag_values=fv)
    flags.DEFINE_list("eps", [str(e) for e in DEFAULT_EPS], "Eps values, integers on the "
                      "0..255 scale.", flag_values=fv)
    flags.DEFINE_integer("num_examples", -1, "Examples to attack; -1: the whole split (the "
                         "last partial batch is dropped).", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Batch size (default: the checkpoint's "
                         "eval_batch_size).", flag_values=fv)
    flags.DEFINE_string("split_name", "validation", "train or validation.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.", flag_values=fv)
    flags.DEFINE_string("dataset", None, "Default: the checkpoint's config.", flag_values=fv)
    flags.DEFINE_integer("dataset_image_size", None, "Default: the checkpoint's config.",
                         flag_values=fv)
    flags.DEFINE_float("moving_average_decay", None, "> 0 evaluates the moving averages "
                       "(default: the checkpoint's config; imported release checkpoints: -1).",
                       flag_values=fv)
    flags.DEFINE_string("model_name", None, "Default: the checkpoint's meta.", flag_values=fv)
    flags.DEFINE_string("imagenet_data_dir", None, "ImageNet TFRecords (or TFDS).",
                        flag_values=fv)
    flags.DEFINE_string("tiny_imagenet_data_dir", None, "Tiny ImageNet TFRecords.",
                        flag_values=fv)
    flags.DEFINE_string("large_eps_attack", "apgdce_128_50", "Masking check: this attack "
                        "must bring accuracy to ~0.", flag_values=fv)
    flags.DEFINE_integer("num_images", 8, "Examples shown in adversarial_examples.png.",
                         flag_values=fv)


def config_from_flags(fv=None) -> RunConfig:
    """A RunConfig from parsed flags; ValueError naming a malformed value."""
    from absl import flags

    fv = flags.FLAGS if fv is None else fv
    if not fv.checkpoint_path:
        raise ValueError("--checkpoint_path is required.")
    eps = []
    for e in fv.eps:
        if not (e.strip().isascii() and e.strip().isdigit()):
            raise ValueError(f"--eps values must be integers on the 0..255 scale, got {e!r}.")
        eps.append(int(e))
    data_dir = fv.imagenet_data_dir or fv.tiny_imagenet_data_dir
    cfg = RunConfig(
        checkpoint_path=fv.checkpoint_path, output_dir=fv.output_dir,
        attacks=tuple(a.strip() for a in fv.attacks), eps=tuple(eps),
        num_examples=fv.num_examples, batch_size=fv.batch_size, split=fv.split_name,
        seed=fv.seed, dataset=fv.dataset, dataset_image_size=fv.dataset_image_size,
        moving_average_decay=fv.moving_average_decay, model_name=fv.model_name,
        data_dir=data_dir, large_eps_attack=fv.large_eps_attack, num_images=fv.num_images)
    validate(cfg)
    return cfg


def main(argv: list[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from alp_jax import cli

    cli.setup_logging()
    try:
        cfg = config_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run_robustness(cfg, progress=ProgressBar())


def run() -> None:
    """Console entry point ``alp-robustness``."""
    from absl import app

    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
