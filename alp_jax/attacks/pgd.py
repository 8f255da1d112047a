"""The original PGD (``pgd``, ``pgdll``, ``pgdrnd``) and ``pgdtrue``, and the parts every
signed-gradient attack of this package is built from (label choice, objective, signed step,
projection, random start).

Attacks are pure functions with a ``lax.fori_loop``, so compile time does not grow with
NITER and the whole attack works under ``jit`` and ``vmap``. ``alp_jax.pgd`` is the public
face of this module (and of the grammar's parse/generate functions); the attack modules
import from here, so nothing in ``alp_jax.attacks`` imports ``alp_jax.pgd``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from alp_jax.attacks.grammar import AttackSpec, Bounds, LogitsFn
from alp_jax.losses import softmax_cross_entropy

# ---- parts ------------------------------------------------------------------------------

def pixel_scale(bounds: Bounds) -> float:
    """Size of one 0..255 unit in model input units."""
    return (bounds[1] - bounds[0]) / 255.0


def project(x: jax.Array, x0: jax.Array, eps: float | jax.Array, bounds: Bounds) -> jax.Array:
    """Clip into the L-inf eps-ball around ``x0``, then into the pixel bounds."""
    return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), bounds[0], bounds[1])


def random_start(key: jax.Array, x0: jax.Array, eps: float | jax.Array,
                 bounds: Bounds) -> jax.Array:
    """``x0 + U(-eps, eps)``, projected."""
    noise = jax.random.uniform(key, x0.shape, x0.dtype, -1.0, 1.0) * eps
    return project(x0 + noise, x0, eps, bounds)


def choose_labels(label: str, clean_logits: jax.Array, key: jax.Array,
                  labels: jax.Array | None = None) -> tuple[jax.Array, bool]:
    """(labels or targets, targeted) for a PGD label kind (``AttackSpec.label``) or method.

    ``prediction`` (``pgd``): the model's own prediction, untargeted; ``least_likely``
    (``pgdll``): the clean least likely class, targeted; ``random`` (``pgdrnd``): a uniformly
    random class from ``key``, targeted; ``true`` (``pgdtrue``): ``labels``, untargeted.
    """
    label = _METHOD_LABELS.get(label, label)
    if label == "prediction":
        return jnp.argmax(clean_logits, -1), False
    if label == "true":
        if labels is None:
            raise ValueError("choose_labels: the true-label attack needs labels=.")
        return labels, False
    if label == "least_likely":
        return jnp.argmin(clean_logits, -1), True
    if label == "random":
        n, num_classes = clean_logits.shape
        return jax.random.randint(key, (n,), 0, num_classes), True
    raise ValueError(f"choose_labels: unknown PGD label kind {label!r}; valid: "
                     f"{', '.join([*_METHOD_LABELS, *_METHOD_LABELS.values()])}")


_METHOD_LABELS = {"pgd": "prediction", "pgdll": "least_likely", "pgdrnd": "random",
                  "pgdtrue": "true"}


def summed_xent(logits_fn: LogitsFn, labels: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """The original attack objective: cross-entropy summed over the batch."""
    return lambda x: jnp.sum(softmax_cross_entropy(logits_fn(x), labels))


def signed_gradient_loop(objective: Callable[[jax.Array], jax.Array], x_init: jax.Array,
                         x0: jax.Array, eps: float | jax.Array, step: float | jax.Array,
                         niter: int, bounds: Bounds, direction: float) -> jax.Array:
    """``niter`` steps of ``x <- project(x + direction*step*sign(grad objective))``."""
    grad_fn = jax.grad(objective)

    def body(_, x):
        x = x + direction * step * jnp.sign(grad_fn(x))
        return project(x, x0, eps, bounds)

    return jax.lax.fori_loop(0, niter, body, x_init)


# ---- PGD --------------------------------------------------------------------------------

def run_pgd(logits_fn: LogitsFn, images: jax.Array, key: jax.Array, spec: AttackSpec, *,
            bounds: Bounds = (-1.0, 1.0), random_start: bool = True,
            labels: jax.Array | None = None) -> jax.Array:
    """One run of the original PGD (``pgd``, ``pgdll``, ``pgdrnd``) or ``pgdtrue``."""
    scale = pixel_scale(bounds)
    eps, step = spec.eps * scale, spec.step * scale
    k_start, k_target = jax.random.split(key)
    x0 = jax.lax.stop_gradient(images)
    if spec.true_label and labels is None:
        raise ValueError(f"Attack {spec.spec!r} attacks the true label; pass labels=.")
    labels = labels if spec.true_label else None
    needs_clean = spec.label in ("prediction", "least_likely")
    clean_logits = logits_fn(x0) if needs_clean else jnp.zeros(
        jax.eval_shape(logits_fn, x0).shape, jnp.float32)
    targets, targeted = choose_labels(spec.label, clean_logits, k_target, labels)
    x = _start(k_start, x0, eps, bounds, random_start)
    x = signed_gradient_loop(summed_xent(logits_fn, targets), x, x0, eps, step, spec.niter,
                             bounds, -1.0 if targeted else 1.0)
    return jax.lax.stop_gradient(x)


def _start(key: jax.Array, x0: jax.Array, eps: float, bounds: Bounds,
           use_random: bool) -> jax.Array:
    if use_random:
        return random_start(key, x0, eps, bounds)
    return project(x0, x0, eps, bounds)
