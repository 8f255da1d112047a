"""Training objectives: how a train step crafts its inputs and turns logits into losses.

An objective is three small pure functions used by ``alp_jax.steps.make_train_step``:

- ``craft(model, variables, images, labels, key, attack, bounds)``: adversarial images
  (or None to train on clean images only);
- ``loss(logits, labels, key)``: a dict of named loss terms (weight decay is added by the
  step) where ``logits`` come from one training-mode pass on the clean images, or on the
  interleaved mixed minibatch ``[clean0, adv0, clean1, adv1, ...]`` when ``craft``
  returned images;
- ``accuracies(logits, labels, mixed)``: training accuracies for the summaries.

``alp`` is the original: ``train_adv_method='clean'`` trains on clean images,
``pgd*`` with ``train_lp_weight <= 0`` is mixed-minibatch PGD training, and with
``train_lp_weight > 0`` adversarial logit pairing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from alp_jax import losses
from alp_jax.pgd import AttackSpec, generate_adversarial_examples


def split_mixed(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Clean and adversarial halves of interleaved mixed-minibatch logits."""
    return logits[0::2], logits[1::2]


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(losses.topk_correct(logits, labels, 1).astype(jnp.float32))


def mixed_accuracies(logits: jax.Array, labels: jax.Array, mixed: bool) -> dict[str, jax.Array]:
    if not mixed:
        return {"clean_accuracy": _accuracy(logits, labels)}
    clean, adv = split_mixed(logits)
    return {"clean_accuracy": _accuracy(clean, labels), "adv_accuracy": _accuracy(adv, labels)}


def pgd_craft(model: Any, variables: dict[str, Any], images: jax.Array, labels: jax.Array,
              key: jax.Array, attack: AttackSpec, bounds: tuple[float, float]
              ) -> jax.Array | None:
    """Adversarial examples from the current weights in inference mode (None for clean)."""
    if attack.is_clean:
        return None
    frozen = jax.lax.stop_gradient(variables)
    return generate_adversarial_examples(
        lambda x: model.apply(frozen, x, train=False), images, key, attack, bounds,
        labels=labels)


@dataclasses.dataclass(frozen=True)
class Objective:
    craft: Callable[..., jax.Array | None]
    loss: Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]
    accuracies: Callable[[jax.Array, jax.Array, bool], dict[str, jax.Array]] = mixed_accuracies


def alp_objective(label_smoothing: float, lp_weight: float, mixed: bool) -> Objective:
    """The original objective (clean, mixed-minibatch PGD, or ALP)."""

    def loss(logits, labels, key):
        del key
        if not mixed:
            return {"loss_xent": losses.smoothed_cross_entropy(logits, labels, label_smoothing),
                    "loss_lp": jnp.zeros((), jnp.float32)}
        clean, adv = split_mixed(logits)
        both = jnp.repeat(labels, 2)
        return {"loss_xent": losses.smoothed_cross_entropy(logits, both, label_smoothing),
                "loss_lp": losses.logit_pairing_loss(clean, adv, lp_weight)}

    return Objective(pgd_craft, loss)


_REGISTRY: dict[str, Callable[[Any, bool], Objective]] = {
    "alp": lambda config, mixed: alp_objective(
        config.label_smoothing, config.train_lp_weight, mixed),
}


def register_objective(name: str, factory: Callable[[Any, bool], Objective]) -> None:
    """Adds ``train_objective=name``; ``factory(config, mixed)`` builds it."""
    _REGISTRY[name] = factory


def get_objective(config: Any) -> Objective:
    """The objective named by ``config.train_objective`` (default ``alp``)."""
    name = config.get("train_objective", "alp")
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown train_objective {name!r}; valid: {', '.join(sorted(_REGISTRY))}.")
    from alp_jax.pgd import parse_attack

    mixed = not parse_attack(config.train_adv_method).is_clean
    return _REGISTRY[name](config, mixed)
