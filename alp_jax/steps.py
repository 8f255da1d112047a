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
from alp_jax.attacks.common import inference_logits_fn  # noqa: F401  (re-exported)
from alp_jax.pgd import AttackSpec, generate_adversarial_examples, parse_attack
from alp_jax.train_state import (
    TrainState,
    ema_decay,
    ema_update,
    optimizer_from_config,
    trainable_mask_fn,
)

Metrics = dict[str, jax.Array]


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[a0, b0, a1, b1, ...]: the mixed minibatch, laid out so that each data shard holds
    its own clean examples and their adversarial versions (no cross-device shuffle)."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def make_train_step(config: Any, model: Any) -> Callable[..., tuple[TrainState, Metrics]]:
    """The ALP / mixed-minibatch PGD / clean train step a config asks for.

    1. Craft adversarial examples from the current weights in inference mode.
    2. One training-mode forward pass on the mixed minibatch (clean + adversarial, labels
       duplicated), so BatchNorm statistics cover both halves.
    3. Smoothed cross-entropy + logit pairing (when ``train_lp_weight`` > 0) + weight
       decay over trainable parameters; TF1 optimizer update; moving averages.
    """
    tx, schedule = optimizer_from_config(config, config.examples_per_epoch)
    attack = parse_attack(config.train_adv_method)
    bounds = tuple(config.bounds)
    objective = objectives.get_objective(config)
    mask_fn = trainable_mask_fn(config.get("finetune_trainable_scopes", ""))
    decay = float(config.moving_average_decay)
    global_batch = config.batch_size * config.num_replicas

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array,
                   key: jax.Array | None = None) -> tuple[TrainState, Metrics]:
        if key is None:
            key = jax.random.fold_in(state.rng, state.step)
        k_attack, k_obj = jax.random.split(key)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        adv = objective.craft(model, variables, images, labels, k_attack, attack, bounds)

        def loss_fn(params):
            inputs = images if adv is None else interleave(images, adv)
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                mutable=["batch_stats"])
            terms = objective.loss(logits, labels, k_obj)
            mask = mask_fn(params) if mask_fn else None
            terms["loss_wd"] = losses.weight_decay_loss(params, config.weight_decay, mask)
            total = sum(terms.values())
            return total, (updates["batch_stats"], logits, terms)

        (total, (batch_stats, logits, terms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema_params, ema_stats = state.ema_params, state.ema_batch_stats
        if decay > 0:
            d = ema_decay(decay, step)
            ema_params = ema_update(ema_params, params, d)
            ema_stats = ema_update(ema_stats, batch_stats, d)
        new_state = state.replace(step=step, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, ema_params=ema_params,
                                  ema_batch_stats=ema_stats)
        metrics = dict(terms)
        metrics["total_loss"] = total
        metrics["learning_rate"] = schedule(state.step)
        metrics["current_epoch"] = (step * global_batch).astype(jnp.float32) / float(
            config.examples_per_epoch)
        metrics.update(objective.accuracies(logits, labels, adv is not None))
        return new_state, metrics

    return train_step


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
