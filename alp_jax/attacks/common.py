"""Parts the attack families share: reference labels, margins, random starts, and the
worst case over several runs (restarts, target classes). Parsing is
``alp_jax.attacks.grammar``'s.

Success inside the attacks means ``margin > 0``: some other logit is strictly larger
than the reference label's. The scoring (``losses.topk_correct``) also counts an exact tie
with a lower class index, and any non-finite logit, as an error; the accuracy reported is
always that scoring of the examples an attack returns, so an exact tie can make an attack's
bookkeeping more cautious, never its reported result better for the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from alp_jax.attacks import pgd
from alp_jax.attacks.grammar import AttackSpec, Bounds, LogitsFn


def inference_logits_fn(model: Any, variables: Any) -> LogitsFn:
    """Inference-mode logits with no gradient into the variables: what every attack of
    training and evaluation sees (BatchNorm on its moving statistics)."""
    frozen = jax.lax.stop_gradient(variables)
    return lambda x: model.apply(frozen, x, train=False)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per example ``max_{j != y} z_j - z_y``: > 0 exactly when the example is misclassified."""
    logits = logits.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.max(others, axis=-1) - label_logit


def reference_labels(spec: AttackSpec, clean_logits: jax.Array,
                     labels: jax.Array | None) -> jax.Array:
    """The labels an attack moves away from: the true ones for a true-label attack, else
    the model's clean prediction (``pgd``, ``pgdll``, ``pgdrnd``, as the original)."""
    if not spec.true_label:
        return jnp.argmax(clean_logits, -1)
    if labels is None:
        raise ValueError(f"Attack {spec.spec!r} attacks the true label; pass labels=.")
    return labels


def start(key: jax.Array, x0: jax.Array, eps: float | jax.Array, bounds: Bounds,
          use_random: jax.Array | bool) -> jax.Array:
    """Uniform random start in the eps-ball, or the clean images (a traced choice, so one
    trace serves the first run and the restarts)."""
    return jnp.where(use_random, pgd.random_start(key, x0, eps, bounds),
                     pgd.project(x0, x0, eps, bounds))


RunFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def worst_case_runs(run: RunFn, logits_fn: LogitsFn, x0: jax.Array, ref: jax.Array,
                    key: jax.Array, num_runs: int, runs_per_group: int,
                    random_start: bool) -> jax.Array:
    """Per example, the first run that succeeds, else the run with the largest margin.

    ``run(index, key, use_random) -> x`` is one attack run; run 0 gets ``key`` and run
    ``r > 0`` gets ``fold_in(key, r)``, so the first run of a K-run attack is the whole of
    the 1-run attack and more runs can only add successes. ``use_random`` is False only for the
    first run of each group of ``runs_per_group`` when ``random_start`` is False. The
    loop ends early once every example is fooled.
    """
    if num_runs == 1:
        return run(jnp.int32(0), key, jnp.asarray(random_start))
    expand = (-1,) + (1,) * (x0.ndim - 1)

    def body(carry):
        r, x_best, m_best, fooled = carry
        use_random = jnp.asarray(random_start) | (r % runs_per_group != 0)
        run_key = jax.lax.cond(r == 0, lambda: key, lambda: jax.random.fold_in(key, r))
        x = run(r, run_key, use_random)
        m = margin(logits_fn(x), ref)
        take = ~fooled & ((m > 0) | (m > m_best))
        return (r + 1, jnp.where(take.reshape(expand), x, x_best), jnp.where(take, m, m_best),
                fooled | (take & (m > 0)))

    # Once every example is fooled, more runs cannot change which ones are: stop early.
    cond = lambda carry: (carry[0] < num_runs) & ~jnp.all(carry[3])
    n = x0.shape[0]
    init = (jnp.int32(0), x0, jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), bool))
    return jax.lax.while_loop(cond, body, init)[1]
