"""Pure train and eval steps: ``(state, images, labels, key) -> (state, metrics)``.

The steps hold no device placement: ``alp_jax.sharding`` jits them with shardings, and
the same function runs on one CPU or a pod slice. Under a data-parallel mesh, BatchNorm
statistics (``jnp.mean`` over the batch axis) are global-batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alp_jax import losses, objectives
from alp_jax import train_state as ts
from alp_jax.attacks.common import inference_logits_fn  # noqa: F401  (re-exported)
from alp_jax.pgd import AttackSpec, generate_adversarial_examples, parse_attack
from alp_jax.train_state import Schedule, TrainState

Metrics = dict[str, jax.Array]


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[a0, b0, a1, b1, ...]: the mixed minibatch, laid out so that each data shard holds
    its own clean examples and their adversarial versions (no cross-device shuffle)."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _freeze(updates: Any, mask: Any) -> Any:
    """Zero updates outside ``mask`` (Python bools at trace time, or boolean arrays)."""
    def one(u, m):
        if isinstance(m, bool):
            return u if m else jnp.zeros_like(u)
        return jnp.where(m, u, jnp.zeros_like(u))

    return jax.tree_util.tree_map(one, updates, mask)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: Schedule | None,
    objective: objectives.Objective,
    attack: str | AttackSpec,
    *,
    bounds: tuple[float, float] = (-1.0, 1.0),
    weight_decay: float = 0.0,
    trainable_mask: Any | Callable[[Any], Any] | None = None,
    ema_decay: float = 0.0,
    examples_per_epoch: int | None = None,
    global_batch: int | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """A pure train step ``(state, images, labels[, key]) -> (state, metrics)``.

    1. ``objective.craft`` makes adversarial examples of ``attack`` from the current
       weights in inference mode (None for ``clean``).
    2. One training-mode forward pass of ``model`` on the mixed minibatch (clean and
       adversarial interleaved, labels duplicated), so BatchNorm statistics cover both.
    3. ``objective.loss`` + ``weight_decay`` * the original's L2 term over the trainable
       parameters; the update of ``tx`` (any optax transformation; ``state.opt_state`` is
       its state); moving averages with TF's decay ``min(ema_decay, (1+t)/(10+t))`` when
       ``ema_decay`` > 0 (the state must then hold averages).

    ``trainable_mask`` (a bool pytree over the parameters, or a function returning one):
    only those parameters get weight decay and move, whatever ``tx`` does. ``schedule``
    (step -> learning rate, or None) is reported as ``learning_rate``; with
    ``examples_per_epoch`` and ``global_batch`` the metrics include ``current_epoch``.
    """
    spec = parse_attack(attack)
    bounds = (float(bounds[0]), float(bounds[1]))
    decay = float(ema_decay)

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                   key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
        if key is None:
            key = jax.random.fold_in(state.rng, state.step)
        k_attack, k_obj = jax.random.split(key)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        adv = objective.craft(model, variables, images, labels, k_attack, spec, bounds)
        mask = trainable_mask(state.params) if callable(trainable_mask) else trainable_mask

        def loss_fn(params):
            inputs = images if adv is None else interleave(images, adv)
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                mutable=["batch_stats"])
            terms = objective.loss(logits, labels, k_obj)
            terms["loss_wd"] = losses.weight_decay_loss(params, weight_decay, mask)
            total = sum(terms.values())
            return total, (updates["batch_stats"], logits, terms)

        (total, (batch_stats, logits, terms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if mask is not None:
            updates = _freeze(updates, mask)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema_params, ema_stats = state.ema_params, state.ema_batch_stats
        if decay > 0:
            if ema_params is None:
                raise ValueError("ema_decay > 0 needs a state with moving averages "
                                 "(create_train_state(..., moving_average_decay > 0)).")
            d = ts.ema_decay(decay, step)
            ema_params = ts.ema_update(ema_params, params, d)
            ema_stats = ts.ema_update(ema_stats, batch_stats, d)
        new_state = state.replace(step=step, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, ema_params=ema_params,
                                  ema_batch_stats=ema_stats)
        metrics = dict(terms)
        metrics["total_loss"] = total
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        if examples_per_epoch and global_batch:
            metrics["current_epoch"] = (step * global_batch).astype(jnp.float32) / float(
                examples_per_epoch)
        metrics.update(objective.accuracies(logits, labels, adv is not None))
        return new_state, metrics

    return train_step


def train_step_from_config(config: Any, model: Any,
                           tx: optax.GradientTransformation | None = None,
                           schedule: Schedule | None = None
                           ) -> Callable[..., tuple[TrainState, Metrics]]:
    """``make_train_step`` with the objective, attack, weight decay, trainable scopes and
    moving-average decay a config asks for; ``tx`` and ``schedule`` default to the
    config's optimizer (``train_state.optimizer_from_config``)."""
    if tx is None:
        tx, schedule = ts.optimizer_from_config(config)
    return make_train_step(
        model, tx, schedule, objectives.get_objective(config), config.train_adv_method,
        bounds=tuple(config.bounds), weight_decay=config.weight_decay,
        trainable_mask=ts.trainable_mask_fn(config.get("finetune_trainable_scopes", "")),
        ema_decay=config.moving_average_decay,
        examples_per_epoch=config.examples_per_epoch,
        global_batch=config.batch_size * config.num_replicas)


def make_eval_step(model: Any, attack: str | AttackSpec = "clean",
                   bounds: tuple[float, float] = (-1.0, 1.0), *, use_ema: bool = False
                   ) -> Callable[..., Metrics]:
    """``(state_or_variables, images, labels, key[, mask]) -> {'top1', 'top5', 'count'}`` sums.

    Top-1 accuracy and top-5 recall as the original's eval, on clean or attacked inputs;
    ``use_ema`` reads the moving averages of a TrainState.
    """
    spec = parse_attack(attack)

    def eval_step(state: TrainState | dict[str, Any], images: jax.Array, labels: jax.Array,
                  key: jax.Array, mask: jax.Array | None = None) -> Metrics:
        variables = state.variables(use_ema) if isinstance(state, TrainState) else state
        logits_fn = inference_logits_fn(model, variables)
        x = generate_adversarial_examples(logits_fn, images, key, spec, bounds, labels=labels)
        logits = logits_fn(x)
        k = min(5, logits.shape[-1])
        # ``mask`` drops padding rows (a batch padded to a multiple of the device count).
        m = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
        return {"top1": jnp.sum(losses.topk_correct(logits, labels, 1) * m),
                "top5": jnp.sum(losses.topk_correct(logits, labels, k) * m),
                "count": jnp.sum(m)}

    return eval_step
