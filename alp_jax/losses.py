"""Loss terms of the original ALP objective, as small pure functions.

Reductions follow ``tf.losses`` defaults (SUM_BY_NONZERO_WEIGHTS with a scalar weight,
i.e. a plain mean), so the values match the original's summaries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alp_jax.errors import ConfigError


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy against integer labels, computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                           label_smoothing: float = 0.0) -> jax.Array:
    """Mean over the batch of cross-entropy with ``one_hot*(1-ls) + ls/num_classes`` targets."""
    num_classes = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return jnp.mean(-jnp.sum(targets * logp, axis=-1))


def logit_pairing_loss(clean_logits: jax.Array, adv_logits: jax.Array,
                       weight: float) -> jax.Array:
    """ALP term: ``weight * mean over all elements of (clean - adv)^2``; 0 when weight <= 0."""
    if weight <= 0:
        return jnp.zeros((), jnp.float32)
    diff = clean_logits.astype(jnp.float32) - adv_logits.astype(jnp.float32)
    return weight * jnp.mean(jnp.square(diff))


def weight_decay_loss(params: Any, weight: float, mask: Any | None = None) -> jax.Array:
    """``weight * sum(v^2)/2`` over all (or the masked-in, i.e. trainable) parameters.

    Like the original, BatchNorm gamma/beta and biases are included.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if mask is not None:
        leaves = [x for x, m in zip(leaves, jax.tree_util.tree_leaves(mask), strict=True) if m]
    if weight == 0 or not leaves:
        return jnp.zeros((), jnp.float32)
    return weight * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves) / 2.0


def topk_correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """Per-example bool: the label is among the top-k logits.

    Ties break towards the lower class index, as the original's metrics do
    (``tf.argmax`` for top-1, ``tf.nn.top_k`` inside ``recall_at_k``), so a model whose
    logits are all equal scores the share of class 0, not 100%. A row with any non-finite
    logit counts as wrong: NaN compares false with everything and would otherwise score as
    correct. So does a label outside ``[0, num_classes)``: its lookup gives NaN (or wraps,
    for a negative one), and nothing can raise inside jit; ``check_labels`` is the host-side
    error for the same mistake.
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe = jnp.where(in_range, labels, 0)
    label_logit = jnp.take_along_axis(logits, safe[:, None], axis=-1)
    lower = jnp.arange(logits.shape[-1])[None, :] < safe[:, None]
    rank = jnp.sum((logits > label_logit) | ((logits == label_logit) & lower), axis=-1)
    return (rank < k) & in_range & jnp.all(jnp.isfinite(logits), axis=-1)


def check_labels(labels: Any, num_classes: int, *, what: str = "labels") -> None:
    """Raises ConfigError (a ValueError) naming the first label outside ``[0, num_classes)``
    (host, NumPy).

    A model with fewer classes than the data would otherwise train on, and score, labels it
    has no logit for.
    """
    labels = np.asarray(labels).reshape(-1)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(
            f"{what}: label {labels[i]} at index {i} is outside [0, {num_classes}): the model "
            f"has {num_classes} classes (does --config.num_classes match the data set?)")


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """Per-example ``KL(softmax(p) || softmax(q))``, computed in float32."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def clean_logit_pairing_loss(logits: jax.Array, weight: float) -> jax.Array:
    """Clean logit pairing: ``weight * mean((z[0::2] - z[1::2])^2)``; 0 when weight <= 0.

    Pairs example 2i with 2i+1. Batches are shuffled, so these are random pairs of clean
    examples as in the paper, and the pairs stay inside each data shard.
    """
    if logits.shape[0] % 2:
        raise ValueError(f"Clean logit pairing needs an even batch, got {logits.shape[0]} "
                         "examples.")
    return logit_pairing_loss(logits[0::2], logits[1::2], weight)


def logit_squeezing_loss(logits: jax.Array, weight: float) -> jax.Array:
    """Logit squeezing: ``weight * mean over all elements of z^2`` (the reduction of the
    pairing terms, i.e. the squared L2 norm of the logits / classes); 0 when weight <= 0."""
    if weight <= 0:
        return jnp.zeros((), jnp.float32)
    return weight * jnp.mean(jnp.square(logits.astype(jnp.float32)))
