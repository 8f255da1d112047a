"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: a score-based black-box attack.

Spec: ``square_EPS_NQUERIES[_rK]`` (EPS on the 0..255 scale; NQUERIES iterations, one
model query each, after one query for the start; K runs, worst case per example).

It never looks at a gradient, so it is the check that white-box numbers are not an
artefact of masked gradients: if Square fools clearly more examples than PGD/APGD, the
gradients are lying. As in the paper: start from vertical stripes of +-eps; each
iteration redraws one square window per example (every channel of it set to x0 +- eps)
and keeps it when the margin loss ``z_y - max_{j != y} z_j`` of the true label drops;
examples stop once misclassified. The window covers a fraction p of the image, p halving
on the paper's schedule (at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000
queries, rescaled to NQUERIES) from ``P_INIT`` = 0.8 (AutoAttack's setting). Windows and
signs are drawn per example, as in the paper's code. The loop is a ``lax.while_loop``
that ends early when every example is fooled. ``random_start`` does not apply (the
stripes are the method's own random start).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from alp_jax.attacks import common, pgd
from alp_jax.attacks.grammar import AttackSpec, Bounds, LogitsFn

P_INIT = 0.8
_P_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10,000 queries


def halvings(iteration, num_queries: int):
    """How often p has halved by ``iteration`` (a Python int or a traced int32).

    The paper halves p when ``int(iteration / num_queries * 10000)`` passes each break,
    i.e. from iteration ``ceil((break + 1) * num_queries / 10000)`` on (exact integers).
    """
    firsts = [-(-(b + 1) * num_queries // 10000) for b in _P_BREAKS]
    return sum((iteration >= f) * 1 for f in firsts)


def p_selection(iteration: int, num_queries: int, p_init: float = P_INIT) -> float:
    """The fraction of pixels the window covers at ``iteration`` (the paper's schedule)."""
    return p_init / 2 ** halvings(iteration, num_queries)


def size_per_halving(height: int, width: int, p_init: float = P_INIT) -> np.ndarray:
    """Window side in pixels (1 .. min(height, width) - 1) after 0..9 halvings of p."""
    side = max(min(height, width) - 1, 1)
    return np.asarray([min(max(int(round(math.sqrt(p_init / 2 ** k * height * width))), 1), side)
                       for k in range(len(_P_BREAKS) + 1)], np.int32)


def window_sizes(num_queries: int, height: int, width: int,
                 p_init: float = P_INIT) -> np.ndarray:
    """Side of the square window per iteration, in pixels."""
    sizes = size_per_halving(height, width, p_init)
    return np.asarray([sizes[halvings(i, num_queries)] for i in range(num_queries)], np.int32)


def square_run(logits_fn: LogitsFn, x0: jax.Array, labels: jax.Array, key: jax.Array,
               eps: float | jax.Array, num_queries: int, bounds: Bounds,
               p_init: float = P_INIT) -> jax.Array:
    """One run of the L-inf Square Attack on NHWC images; see the module docstring."""
    n, h, w, c = x0.shape
    lo, hi = bounds
    # Ten sizes indexed by the halving count: the program does not grow with NQUERIES.
    sizes = jnp.asarray(size_per_halving(h, w, p_init))
    k_init, k_loop = jax.random.split(key)
    stripes = jax.random.rademacher(k_init, (n, 1, w, c), jnp.float32)
    x_best = jnp.clip(x0 + eps * stripes, lo, hi).astype(x0.dtype)
    m_best = common.margin(logits_fn(x_best), labels)
    rows, cols = jnp.arange(h), jnp.arange(w)

    def cond(state):
        i, _, m = state
        return (i < num_queries) & jnp.any(m <= 0)

    def body(state):
        i, x_best, m_best = state
        s = sizes[halvings(i, num_queries)]
        k_h, k_w, k_sign = jax.random.split(jax.random.fold_in(k_loop, i), 3)
        top = jax.random.randint(k_h, (n,), 0, h - s + 1)
        left = jax.random.randint(k_w, (n,), 0, w - s + 1)
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s)
        in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)
        window = in_rows[:, :, None, None] & in_cols[:, None, :, None]
        signs = jax.random.rademacher(k_sign, (n, 1, 1, c), jnp.float32)
        corner = jnp.clip(x0 + eps * signs, lo, hi).astype(x0.dtype)
        x_new = jnp.where(window, corner, x_best)
        m_new = common.margin(logits_fn(x_new), labels)
        better = (m_best <= 0) & (m_new > m_best)  # fooled examples stay where they are
        x_best = jnp.where(better[:, None, None, None], x_new, x_best)
        return i + 1, x_best, jnp.where(better, m_new, m_best)

    _, x_best, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, m_best))
    return x_best


def run(logits_fn: LogitsFn, images: jax.Array, key: jax.Array, spec: AttackSpec, *,
        bounds: Bounds = (-1.0, 1.0), random_start: bool = True,
        labels: jax.Array | None = None) -> jax.Array:
    """Square Attack for ``spec`` (``random_start`` is ignored, see the module doc)."""
    del random_start
    if labels is None:
        raise ValueError(f"Attack {spec.spec!r} attacks the true label; pass labels=.")
    eps = spec.eps * pgd.pixel_scale(bounds)
    x0 = jax.lax.stop_gradient(images)
    one_run = lambda r, k, use_random: square_run(logits_fn, x0, labels, k, eps, spec.niter,
                                                  bounds)
    x = common.worst_case_runs(one_run, logits_fn, x0, labels, key, spec.restarts,
                               spec.restarts, True)
    return jax.lax.stop_gradient(x)
