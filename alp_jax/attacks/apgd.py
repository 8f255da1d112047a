"""Auto-PGD (Croce & Hein, ICML 2020), L-inf, with the cross-entropy or the DLR loss.

Specs (EPS on the 0..255 scale; no STEP, the step size adapts):

- ``apgdce_EPS_NITER``: untargeted APGD on the cross-entropy of the true label.
- ``apgddlr_EPS_NITER``: untargeted APGD on the DLR loss
  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` (needs >= 3 classes), invariant to
  shifts and scaling of the logits, so a saturated softmax cannot hide the gradient.
- suffix ``_tK`` (e.g. ``apgddlr_16_100_t9``): targeted runs, one per each of the K
  classes with the largest clean logits other than the true label (APGD-T: the targeted
  DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, >= 4 classes; with ``apgdce``
  the targeted cross-entropy ``-CE(z, t)``).
- suffix ``_rK``: K runs (per target) from random starts.

The result keeps, per example, the first run that misclassifies it, else the run with
the largest margin (``alp_jax.attacks.common.worst_case_runs``). Within a run, as in the
paper and its reference implementation: step size ``2 eps``; momentum 0.75; checkpoints
after ``0.22 N`` iterations, then intervals shrinking by ``0.03 N`` down to ``0.06 N``; at
a checkpoint the step size of an example halves, and it restarts from its best point, when
its loss rose in at most 75% of the steps since the last checkpoint, or its best loss did
not improve and the step was not halved at the last checkpoint. A run returns the last
misclassified point it visited, else its highest-loss point; it stops early once every
example is fooled. The oscillation count of the first interval compares with the starting
loss (the reference compares with 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alp_jax.attacks import common, pgd
from alp_jax.attacks.grammar import AttackSpec, Bounds, LogitsFn
from alp_jax.losses import softmax_cross_entropy

MOMENTUM = 0.75
RHO = 0.75  # the fraction of loss increases below which the step size halves


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Untargeted DLR loss per example (to maximise)."""
    z = logits.astype(jnp.float32)
    zs = jnp.sort(z, axis=-1)
    return common.margin(z, labels) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
    """Targeted DLR loss per example (to maximise)."""
    z = logits.astype(jnp.float32)
    zs = jnp.sort(z, axis=-1)
    pick = lambda c: jnp.take_along_axis(z, c[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return (pick(targets) - pick(labels)) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def _loss_fn(loss: str, labels: jax.Array, targets: jax.Array | None):
    if loss == "dlr":
        if targets is None:
            return lambda z: dlr_loss(z, labels)
        return lambda z: dlr_targeted_loss(z, labels, targets)
    if targets is None:
        return lambda z: softmax_cross_entropy(z, labels)
    return lambda z: -softmax_cross_entropy(z, targets)


def checkpoint_schedule(niter: int) -> tuple[int, int, int]:
    """(first interval, interval decrease, minimal interval) in iterations."""
    return max(int(0.22 * niter), 1), max(int(0.03 * niter), 1), max(int(0.06 * niter), 1)


def apgd_run(logits_fn: LogitsFn, x0: jax.Array, labels: jax.Array, x_init: jax.Array,
             eps: float | jax.Array, niter: int, loss: str, bounds: Bounds,
             targets: jax.Array | None = None) -> jax.Array:
    """One APGD run from ``x_init``; see the module docstring."""
    loss_fn = _loss_fn(loss, labels, targets)
    expand = lambda v: v.reshape((-1,) + (1,) * (x0.ndim - 1))

    def value_and_grad(x):
        def total(x):
            logits = logits_fn(x)
            per_example = loss_fn(logits)
            return jnp.sum(per_example), (per_example, logits)

        (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(x)
        return per_example, logits, g

    first, decrease, minimum = checkpoint_schedule(niter)
    n = x0.shape[0]
    loss0, logits0, grad0 = value_and_grad(x_init)
    fooled0 = common.margin(logits0, labels) > 0
    state = dict(
        x=x_init, x_old=x_init, grad=grad0,
        x_best=x_init, grad_best=grad0, loss_best=loss0,
        x_adv=x_init, fooled=fooled0,
        step=jnp.full((n,), 2.0, jnp.float32) * eps,
        loss_prev=loss0, increases=jnp.zeros((n,), jnp.int32),
        loss_best_last=loss0, reduced_last=jnp.ones((n,), bool),
        since_check=jnp.int32(0), interval=jnp.int32(first),
    )

    def body(carry):
        i, s = carry
        momentum = jnp.where(i > 0, MOMENTUM, 1.0)
        x = s["x"]
        z = pgd.project(x + expand(s["step"]) * jnp.sign(s["grad"]), x0, eps, bounds)
        x_new = pgd.project(x + (z - x) * momentum + (x - s["x_old"]) * (1 - momentum),
                            x0, eps, bounds)
        loss, logits, grad = value_and_grad(x_new)
        miscl = common.margin(logits, labels) > 0
        improved = loss > s["loss_best"]
        x_best = jnp.where(expand(improved), x_new, s["x_best"])
        grad_best = jnp.where(expand(improved), grad, s["grad_best"])
        loss_best = jnp.where(improved, loss, s["loss_best"])
        increases = s["increases"] + (loss > s["loss_prev"]).astype(jnp.int32)
        since = s["since_check"] + 1
        # Checkpoint: halve the step and go back to the best point where progress stalled.
        at_check = since == s["interval"]
        oscillating = increases <= RHO * s["interval"].astype(jnp.float32)
        no_progress = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
        halve = at_check & (oscillating | no_progress)
        return i + 1, dict(
            x=jnp.where(expand(halve), x_best, x_new), x_old=x,
            grad=jnp.where(expand(halve), grad_best, grad),
            x_best=x_best, grad_best=grad_best, loss_best=loss_best,
            x_adv=jnp.where(expand(miscl), x_new, s["x_adv"]), fooled=s["fooled"] | miscl,
            step=jnp.where(halve, s["step"] / 2, s["step"]),
            loss_prev=loss,
            increases=jnp.where(at_check, 0, increases),
            loss_best_last=jnp.where(at_check, loss_best, s["loss_best_last"]),
            reduced_last=jnp.where(at_check, oscillating | no_progress, s["reduced_last"]),
            since_check=jnp.where(at_check, 0, since),
            interval=jnp.where(at_check, jnp.maximum(s["interval"] - decrease, minimum),
                               s["interval"]),
        )

    # Examples stay fooled once fooled, so the loop may stop when all of them are.
    cond = lambda carry: (carry[0] < niter) & ~jnp.all(carry[1]["fooled"])
    _, s = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return jnp.where(expand(s["fooled"]), s["x_adv"], s["x_best"])


def top_other_classes(clean_logits: jax.Array, labels: jax.Array, k: int,
                      spec: str = "") -> jax.Array:
    """[k, n]: per example the k classes with the largest clean logits, the label excluded."""
    num_classes = clean_logits.shape[-1]
    if k > num_classes - 1:
        raise ValueError(f"Attack {spec!r} asks for {k} target classes, but the model has "
                         f"{num_classes} classes (at most {num_classes - 1} targets).")
    z = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf,
                  clean_logits.astype(jnp.float32))
    return jnp.argsort(-z, axis=-1)[:, :k].T


def run(logits_fn: LogitsFn, images: jax.Array, key: jax.Array, spec: AttackSpec, *,
        bounds: Bounds = (-1.0, 1.0), random_start: bool = True,
        labels: jax.Array | None = None) -> jax.Array:
    """APGD for ``spec`` (``apgdce`` / ``apgddlr``, optional targets and restarts)."""
    eps = spec.eps * pgd.pixel_scale(bounds)
    x0 = jax.lax.stop_gradient(images)
    num_classes = jax.eval_shape(logits_fn, x0).shape[-1]
    need = 4 if (spec.loss == "dlr" and spec.targets) else 3 if spec.loss == "dlr" else 2
    if num_classes < need:
        raise ValueError(f"Attack {spec.spec!r} needs at least {need} classes; the model "
                         f"has {num_classes}.")
    if labels is None:
        raise ValueError(f"Attack {spec.spec!r} attacks the true label; pass labels=.")
    targets = None
    if spec.targets:
        targets = top_other_classes(logits_fn(x0), labels, spec.targets, spec.spec)
    runs_per_target = spec.restarts

    def one_run(r, key, use_random):
        t = None if targets is None else targets[r // runs_per_target]
        x_init = common.start(key, x0, eps, bounds, use_random)
        return apgd_run(logits_fn, x0, labels, x_init, eps, spec.niter, spec.loss, bounds, t)

    num_runs = spec.restarts * max(spec.targets, 1)
    x = common.worst_case_runs(one_run, logits_fn, x0, labels, key, num_runs,
                               runs_per_target, random_start)
    return jax.lax.stop_gradient(x)
