"""Training state, the original's optimizers and schedules, and moving averages.

Optimizers follow TF1's update rules exactly (they differ from optax's defaults):

- ``rms`` (tf.train.RMSPropOptimizer): ``ms`` starts at ONES; ``ms = d*ms + (1-d)*g^2``;
  ``mom = m*mom + lr*g/sqrt(ms + eps)`` (epsilon inside the square root, the learning
  rate inside the accumulator); ``var -= mom``.
- ``momentum`` (tf.train.MomentumOptimizer): ``acc = m*acc + g``; ``var -= lr*acc``.
- ``adam`` (tf.train.AdamOptimizer): ``lr_t = lr*sqrt(1-b2^t)/(1-b1^t)``;
  ``var -= lr_t*m/(sqrt(v) + eps)`` (epsilon outside the bias correction).

Update number t (0-based) uses the learning rate of step t. The moving average after
update t uses decay ``min(d, (1+s)/(10+s))`` with s = t+1, the incremented global step,
as TF's ExponentialMovingAverage(num_updates=global_step) saw it after the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from alp_jax import slim_names

Schedule = Callable[[jax.Array], jax.Array]

OPTIMIZERS = ("rms", "momentum", "adam")
LR_SCHEDULES = ("exp_decay", "step", "fixed")


# ---- schedules --------------------------------------------------------------------------

def check_schedule(lr_schedule: str, lr_list: Sequence[float] = (),
                   lr_decay_epochs: Sequence[float] = ()) -> None:
    """ValueError naming an unknown schedule or, for ``step``, values that do not fit:
    ``lr_list`` positive with one more value than ``lr_decay_epochs``, which increase
    from >= 0."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}.")
    if lr_schedule != "step":
        return
    if len(lr_list) != len(lr_decay_epochs) + 1:
        raise ValueError(
            f"lr_list needs one more value than lr_decay_epochs has boundaries, got "
            f"{len(lr_list)} values and {len(lr_decay_epochs)} boundaries.")
    for i, v in enumerate(lr_list):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"lr_list[{i}] must be > 0, got {v!r}.")
    epochs = list(lr_decay_epochs)
    if not all(isinstance(e, (int, float)) and e >= 0 for e in epochs) or any(
            b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"lr_decay_epochs must be increasing and >= 0, got {epochs}.")


def steps_per_epoch(examples_per_epoch: int, batch_size: int, num_replicas: int = 1) -> float:
    """As the original: examples / per-replica batch / replicas."""
    return examples_per_epoch / batch_size / num_replicas


def make_schedule(
    lr_schedule: str,
    learning_rate: float,
    steps_per_epoch: float,
    *,
    lr_decay_factor: float = 0.94,
    lr_num_epochs_per_decay: float = 2.0,
    lr_list: Sequence[float] = (),
    lr_decay_epochs: Sequence[float] = (),
    num_replicas: int = 1,
) -> Schedule:
    """The original learning-rate schedules, multiplied by the number of replicas.

    ``exp_decay``: ``lr * factor^floor(step / int(steps_per_epoch * epochs_per_decay))``.
    ``step``: ``tf.train.piecewise_constant`` over boundaries ``int(e * steps_per_epoch)``
    with values ``lr_list`` as they are (a boundary step still has the earlier value).
    ``fixed``: ``lr``.
    """
    check_schedule(lr_schedule, lr_list, lr_decay_epochs)
    if lr_schedule == "exp_decay":
        decay_steps = max(int(steps_per_epoch * lr_num_epochs_per_decay), 1)

        def schedule(step):
            k = jnp.floor_divide(jnp.asarray(step, jnp.int32), decay_steps)
            return learning_rate * jnp.power(lr_decay_factor, k.astype(jnp.float32)) * num_replicas
    elif lr_schedule == "step":
        boundaries = jnp.asarray([int(e * steps_per_epoch) for e in lr_decay_epochs], jnp.int32)
        values = jnp.asarray(lr_list, jnp.float32)

        def schedule(step):
            idx = jnp.sum(jnp.asarray(step, jnp.int32) > boundaries)
            return values[idx] * num_replicas
    else:  # fixed
        def schedule(step):
            return jnp.asarray(learning_rate * num_replicas, jnp.float32) + 0 * step
    return schedule


# ---- TF1 optimizers ---------------------------------------------------------------------

class RMSPropState(NamedTuple):
    count: jax.Array
    ms: Any
    mom: Any


def tf1_rmsprop(learning_rate: Schedule, decay: float = 0.9, momentum: float = 0.9,
                epsilon: float = 1.0) -> optax.GradientTransformation:
    """tf.train.RMSPropOptimizer (not centered)."""

    def init(params):
        return RMSPropState(jnp.zeros((), jnp.int32),
                            jax.tree_util.tree_map(jnp.ones_like, params),
                            jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        lr = learning_rate(state.count)
        ms = jax.tree_util.tree_map(lambda s, g: decay * s + (1 - decay) * g * g, state.ms, grads)
        mom = jax.tree_util.tree_map(
            lambda m, g, s: momentum * m + lr * g / jnp.sqrt(s + epsilon), state.mom, grads, ms)
        return jax.tree_util.tree_map(jnp.negative, mom), RMSPropState(state.count + 1, ms, mom)

    return optax.GradientTransformation(init, update)


class MomentumState(NamedTuple):
    count: jax.Array
    acc: Any


def tf1_momentum(learning_rate: Schedule, momentum: float = 0.9) -> optax.GradientTransformation:
    """tf.train.MomentumOptimizer (no Nesterov)."""

    def init(params):
        return MomentumState(jnp.zeros((), jnp.int32),
                             jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        lr = learning_rate(state.count)
        acc = jax.tree_util.tree_map(lambda a, g: momentum * a + g, state.acc, grads)
        return (jax.tree_util.tree_map(lambda a: -lr * a, acc),
                MomentumState(state.count + 1, acc))

    return optax.GradientTransformation(init, update)


class AdamState(NamedTuple):
    count: jax.Array
    m: Any
    v: Any


def tf1_adam(learning_rate: Schedule, beta1: float = 0.9, beta2: float = 0.999,
             epsilon: float = 1e-8) -> optax.GradientTransformation:
    """tf.train.AdamOptimizer (epsilon-hat form)."""

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return AdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        del params
        t = (state.count + 1).astype(jnp.float32)
        lr_t = learning_rate(state.count) * jnp.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        m = jax.tree_util.tree_map(lambda m, g: beta1 * m + (1 - beta1) * g, state.m, grads)
        v = jax.tree_util.tree_map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.v, grads)
        updates = jax.tree_util.tree_map(lambda m, v: -lr_t * m / (jnp.sqrt(v) + epsilon), m, v)
        return updates, AdamState(state.count + 1, m, v)

    return optax.GradientTransformation(init, update)


def check_optimizer(name: str) -> None:
    """ValueError naming an optimizer that is not one of the original's."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")


def make_optimizer(name: str, schedule: Schedule, *, momentum: float = 0.9,
                   rmsprop_decay: float = 0.9, rmsprop_epsilon: float = 1.0,
                   trainable_mask: Any | Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformation:
    """One of the original's optimizers; parameters outside ``trainable_mask`` never move."""
    check_optimizer(name)
    if name == "rms":
        tx = tf1_rmsprop(schedule, rmsprop_decay, momentum, rmsprop_epsilon)
    elif name == "momentum":
        tx = tf1_momentum(schedule, momentum)
    else:
        tx = tf1_adam(schedule)
    if trainable_mask is None:
        return tx

    def labels(params):
        mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
        return jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# ---- moving averages --------------------------------------------------------------------

def ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """Effective decay ``min(d, (1+step)/(10+step))`` of TF's ExponentialMovingAverage."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(average: Any, new: Any, decay: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda a, x: a - (1.0 - decay) * (a - x), average, new)


# ---- the state --------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; a pytree of arrays.

    ``ema_params``/``ema_batch_stats`` are None when moving averages are off.
    ``rng`` is a raw uint32 PRNG key; step keys are ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array

    def variables(self, use_ema: bool = False) -> dict[str, Any]:
        """Model variables for ``model.apply``; the averaged ones with ``use_ema``."""
        if use_ema and self.ema_params is not None:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats}


def trainable_mask_fn(trainable_scopes: Sequence[str] | str | None
                      ) -> Callable[[Any], Any] | None:
    """A params -> bool-tree function for the trainable scopes (None: all trainable)."""
    scopes = slim_names.parse_scopes(trainable_scopes)
    if not scopes:
        return None
    return lambda params: slim_names.scope_mask(params, scopes)


def optimizer_from_config(config: Any, examples_per_epoch: int | None = None
                          ) -> tuple[optax.GradientTransformation, Schedule]:
    """The optimizer and learning-rate schedule a config asks for (``examples_per_epoch``
    defaults to the config's)."""
    if examples_per_epoch is None:
        examples_per_epoch = config.examples_per_epoch
    if examples_per_epoch <= 0:
        raise ValueError(f"examples_per_epoch must be positive, got {examples_per_epoch}; "
                         "set config.examples_per_epoch or use train.resolve_config().")
    spe = steps_per_epoch(examples_per_epoch, config.batch_size, config.num_replicas)
    schedule = make_schedule(
        config.lr_schedule, config.learning_rate, spe,
        lr_decay_factor=config.lr_decay_factor,
        lr_num_epochs_per_decay=config.lr_num_epochs_per_decay,
        lr_list=tuple(config.lr_list), lr_decay_epochs=tuple(config.lr_decay_epochs),
        num_replicas=config.num_replicas)
    tx = make_optimizer(
        config.optimizer, schedule, momentum=config.momentum,
        rmsprop_decay=config.rmsprop_decay, rmsprop_epsilon=config.rmsprop_epsilon,
        trainable_mask=trainable_mask_fn(config.get("finetune_trainable_scopes", "")))
    return tx, schedule


def init_variables(model: Any, rng: jax.Array, image_size: int) -> dict[str, Any]:
    """Fresh model variables (jit-compiled init: much faster than eager on CPU)."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, train=False))(rng)


def create_train_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       image_size: int, *, moving_average_decay: float = 0.9999,
                       variables: dict[str, Any] | None = None) -> TrainState:
    """A fresh state; ``variables`` (e.g. loaded for fine-tuning) replace the random init.

    The state holds the arrays of ``variables`` themselves (no copy), so a step jitted with
    ``donate_argnums=0`` frees them: copy ``variables`` first to reuse them.
    """
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model, init_rng, image_size)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    use_ema = moving_average_decay > 0
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
        ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats) if use_ema else None,
        rng=state_rng,
    )
