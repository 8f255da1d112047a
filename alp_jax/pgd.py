"""PGD attacks of the original release: ``pgd``, ``pgdll``, ``pgdrnd`` (and ``pgdtrue``).

``pgd_EPS_STEP_NITER`` is untargeted, against the model's own prediction;
``pgdll_EPS_STEP_NITER`` goes towards the least likely class, ``pgdrnd_EPS_STEP_NITER``
towards a uniformly random class; ``pgdtrue_EPS_STEP_NITER`` is ``pgd`` against the true
label. EPS and STEP are integers on the 0..255 scale, rescaled by ``(hi - lo) / 255`` for
pixel bounds ``(lo, hi)``.

This module is the public face only: the attack and its parts live in
``alp_jax.attacks.pgd``, the spec grammar in ``alp_jax.attacks.grammar``; both are
re-exported here for the callers that have always imported them from this module.
"""

from alp_jax.attacks.grammar import (
    AttackSpec,
    Bounds,
    LogitsFn,
    generate_adversarial_examples,
    parse_attack,
    valid_forms,
)
from alp_jax.attacks.pgd import (
    choose_labels,
    pixel_scale,
    project,
    random_start,
    run_pgd,
    signed_gradient_loop,
    summed_xent,
)

__all__ = [
    "AttackSpec", "Bounds", "LogitsFn", "choose_labels", "generate_adversarial_examples",
    "parse_attack", "pixel_scale", "project", "random_start", "run_pgd",
    "signed_gradient_loop", "summed_xent", "valid_forms",
]
