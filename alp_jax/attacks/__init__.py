"""Attack families beyond the original PGD, for honest robustness evaluation.

Importing this package registers their specs with ``alp_jax.pgd.register_attack``, so
they are accepted wherever an attack spec is (``generate_adversarial_examples``, eval,
training, ``alp_jax.robustness``); ``import alp_jax`` imports it. EPS and STEP are
integers on the 0..255 scale, L-inf; suffixes may come in any order, each once.

| spec | attack |
|---|---|
| ``pgd_EPS_STEP_NITER_rK`` | PGD on the true label's cross-entropy, K random restarts |
| ``pgdll_EPS_STEP_NITER_rK``, ``pgdrnd_..._rK`` | the original targeted PGD, K runs |
| ``pgdcw_EPS_STEP_NITER[_rK]`` | PGD on the CW margin of the true label |
| ``apgdce_EPS_NITER[_tK][_rK]`` | APGD, cross-entropy (``_tK``: targeted, top K classes) |
| ``apgddlr_EPS_NITER[_tK][_rK]`` | APGD, DLR loss (``_tK``: APGD-T, targeted DLR) |
| ``square_EPS_NQUERIES[_rK]`` | Square Attack, score-based black box |

Every multi-run attack (restarts, targets) keeps per example the first run that
misclassifies it, else the run with the largest margin. All of them need the true
labels (``labels=``) except ``pgdll``/``pgdrnd``; all return ``stop_gradient``-ed images
inside the eps-ball and the pixel bounds, and work under ``jit`` and ``vmap``.
"""

from alp_jax.attacks import apgd, restarts, square  # noqa: F401  (registration)

__all__ = ["apgd", "restarts", "square"]
