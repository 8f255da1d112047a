"""K-run PGD (``_rK``, worst case per example) and PGD on the Carlini-Wagner margin.

Serves every PGD family of ``alp_jax.attacks.grammar.FAMILIES``: ``pgd``, ``pgdll``,
``pgdrnd`` (the original methods, against the model's prediction), ``pgdtrue`` (the true
label) and ``pgdcw`` (ascends the CW margin ``max_{j != y} z_j - z_y`` of the true label, no
softmax to saturate). ``_rK`` changes nothing but the number of runs: one run is exactly
``alp_jax.attacks.pgd.run_pgd``, whatever the suffix says.

A K-run attack keeps, per example, the first run that fools it (moves it off the reference
label: the prediction for ``pgd``/``pgdll``/``pgdrnd``, the true label otherwise), else
the run with the largest margin. Run 0 uses the key itself and run r > 0 ``fold_in(key, r)``,
so ``..._rK`` starts with exactly the run of ``..._r1`` and can only fool more examples
with the same key; ``pgdrnd`` draws new random targets per run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alp_jax.attacks import common, pgd
from alp_jax.attacks.grammar import AttackSpec, Bounds, LogitsFn


def run(logits_fn: LogitsFn, images: jax.Array, key: jax.Array, spec: AttackSpec, *,
        bounds: Bounds = (-1.0, 1.0), random_start: bool = True,
        labels: jax.Array | None = None) -> jax.Array:
    """K-run PGD (``spec.restarts``) on cross-entropy or the CW margin; see the module doc."""
    if spec.restarts == 1 and spec.loss == "xent":
        return pgd.run_pgd(logits_fn, images, key, spec, bounds=bounds,
                           random_start=random_start, labels=labels)
    scale = pgd.pixel_scale(bounds)
    eps, step = spec.eps * scale, spec.step * scale
    x0 = jax.lax.stop_gradient(images)
    clean_logits = logits_fn(x0)
    ref = common.reference_labels(spec, clean_logits, labels)

    def one_run(_, key, use_random):
        k_start, k_target = jax.random.split(key)
        if spec.loss == "cw":
            objective = lambda x: jnp.sum(common.margin(logits_fn(x), ref))
            direction = 1.0
        else:
            targets, targeted = pgd.choose_labels(spec.label, clean_logits, k_target,
                                                  ref if spec.true_label else None)
            objective = pgd.summed_xent(logits_fn, targets)
            direction = -1.0 if targeted else 1.0
        x = common.start(k_start, x0, eps, bounds, use_random)
        return pgd.signed_gradient_loop(objective, x, x0, eps, step, spec.niter, bounds,
                                        direction)

    x = common.worst_case_runs(one_run, logits_fn, x0, ref, key, spec.restarts, spec.restarts,
                               random_start)
    return jax.lax.stop_gradient(x)
