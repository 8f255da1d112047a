"""PGD with restarts (worst case per example) and PGD on the Carlini-Wagner margin.

Specs (EPS and STEP integers on the 0..255 scale, as for the original PGD):

- ``pgd_EPS_STEP_NITER_rK``: untargeted PGD on the cross-entropy of the TRUE label
  (``AttackSpec.true_label``), K runs from random starts.
- ``pgdll_EPS_STEP_NITER_rK``, ``pgdrnd_EPS_STEP_NITER_rK``: the original targeted
  methods, K runs (``pgdrnd`` draws new random targets per run).
- ``pgdcw_EPS_STEP_NITER[_rK]``: untargeted PGD ascending the CW margin
  ``max_{j != y} z_j - z_y`` of the true label (no softmax to saturate), K runs (default 1).

A K-run attack keeps, per example, the first run that misclassifies it, else the run with
the largest margin. Run 0 uses the key itself and run r > 0 ``fold_in(key, r)``, so
``..._rK`` can only fool more examples than ``..._r1`` with the same key, and
``pgdll_E_S_N_rK`` starts with exactly the original ``pgdll_E_S_N``. Without the suffix,
``pgd``, ``pgdll`` and ``pgdrnd`` are the original single-run attacks of ``alp_jax.pgd``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alp_jax import pgd
from alp_jax.attacks import common
from alp_jax.pgd import AttackFamily, AttackSpec, Bounds, LogitsFn


def _parse(spec: str, fields: list[str]) -> AttackSpec:
    method = spec.split("_")[0]
    cw = method == "pgdcw"
    if len(fields) <= 3 and not cw:
        return pgd._parse_pgd(spec, fields)  # the original methods and errors, as before
    form = f"{method}_EPS_STEP_NITER" + ("[_rK]" if cw else "_rK")
    if len(fields) not in (3, 4):
        raise common.spec_error(spec, f"expected NAME_EPS_STEP_NITER[_rK] ({form})")
    eps = pgd.parse_int(spec, fields[0], "EPS", 1, 255)
    step = pgd.parse_int(spec, fields[1], "STEP", 1, 255)
    niter = pgd.parse_int(spec, fields[2], "NITER", 1)
    restarts = common.parse_suffixes(spec, fields[3:], "r", form).get("r", 1)
    return AttackSpec(method, eps, step, niter, restarts=restarts,
                      true_label=method in ("pgd", "pgdcw"), spec=spec,
                      loss="cw" if cw else "xent")


def run(logits_fn: LogitsFn, images: jax.Array, key: jax.Array, spec: AttackSpec, *,
        bounds: Bounds = (-1.0, 1.0), random_start: bool = True,
        labels: jax.Array | None = None) -> jax.Array:
    """K-run PGD (``spec.restarts``) on cross-entropy or the CW margin; see the module doc."""
    if spec.restarts == 1 and not spec.true_label and spec.loss == "xent":
        # The original methods (and their _r1 forms, which run 0 below would equal).
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
            targets, targeted = pgd.choose_labels(spec.method, clean_logits, k_target,
                                                  ref if spec.true_label else None)
            objective = pgd.summed_xent(logits_fn, targets)
            direction = -1.0 if targeted else 1.0
        x = common.start(k_start, x0, eps, bounds, use_random)
        return pgd.signed_gradient_loop(objective, x, x0, eps, step, spec.niter, bounds,
                                        direction)

    x = common.worst_case_runs(one_run, logits_fn, x0, ref, key, spec.restarts, spec.restarts,
                               random_start)
    return jax.lax.stop_gradient(x)


for _m in ("pgd", "pgdll", "pgdrnd"):
    pgd.register_attack(_m, AttackFamily(
        (f"{_m}_EPS_STEP_NITER", f"{_m}_EPS_STEP_NITER_rK"), _parse, run))
pgd.register_attack("pgdcw", AttackFamily(("pgdcw_EPS_STEP_NITER[_rK]",), _parse, run))
