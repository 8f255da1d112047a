"""Training objectives: how a train step crafts its inputs and turns logits into losses.

An objective is three small pure functions used by ``alp_jax.steps.make_train_step``:

- ``craft(model, variables, images, labels, key, attack, bounds)``: adversarial images
  (or None to train on clean images only);
- ``loss(logits, labels, key)``: a dict of named loss terms (weight decay is added by the
  step) where ``logits`` come from one training-mode pass on the clean images, or on the
  interleaved mixed minibatch ``[clean0, adv0, clean1, adv1, ...]`` when ``craft``
  returned images;
- ``accuracies(logits, labels, mixed)``: training accuracies for the summaries.

``train_objective`` chooses one (weights: ``train_lp_weight`` for ALP, ``objective_weight``
for the others):

- ``alp``, the original: ``train_adv_method='clean'`` trains on clean images, ``pgd*``
  with ``train_lp_weight <= 0`` is mixed-minibatch PGD training, and with
  ``train_lp_weight > 0`` adversarial logit pairing;
- ``clp``, clean logit pairing (ALP paper, Sec. 4.2): pairs the logits of random pairs of
  clean examples;
- ``lsq``, logit squeezing (ALP paper, Sec. 4.3): a penalty on the logits' squared norm;
- ``trades`` (Zhang et al. 2019): clean cross-entropy + beta * KL(clean || adversarial),
  the adversarial examples crafted to maximise that KL.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from alp_jax import losses
from alp_jax.attacks import pgd
from alp_jax.attacks.common import inference_logits_fn
from alp_jax.attacks.grammar import (
    AttackSpec,
    generate_adversarial_examples,
    parse_attack,
    resolve,
)


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
    return generate_adversarial_examples(inference_logits_fn(model, variables), images, key,
                                         attack, bounds, labels=labels)


def pass_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float,
                       mixed: bool) -> jax.Array:
    """Smoothed cross-entropy over every logit of the training pass (labels duplicated for
    the interleaved mixed minibatch)."""
    both = jnp.repeat(labels, 2) if mixed else labels
    return losses.smoothed_cross_entropy(logits, both, label_smoothing)


@dataclasses.dataclass(frozen=True)
class Objective:
    craft: Callable[..., jax.Array | None]
    loss: Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]
    accuracies: Callable[[jax.Array, jax.Array, bool], dict[str, jax.Array]] = mixed_accuracies


def alp_objective(label_smoothing: float, lp_weight: float, mixed: bool) -> Objective:
    """The original objective (clean, mixed-minibatch PGD, or ALP)."""

    def loss(logits, labels, key):
        del key
        xent = pass_cross_entropy(logits, labels, label_smoothing, mixed)
        if not mixed:
            return {"loss_xent": xent, "loss_lp": jnp.zeros((), jnp.float32)}
        clean, adv = split_mixed(logits)
        return {"loss_xent": xent, "loss_lp": losses.logit_pairing_loss(clean, adv, lp_weight)}

    return Objective(pgd_craft, loss)


def clp_objective(label_smoothing: float, weight: float, mixed: bool) -> Objective:
    """Clean logit pairing: cross-entropy + ``weight * mean((z_2i - z_2i+1)^2)`` over pairs
    of clean examples (with a PGD ``train_adv_method`` the cross-entropy also covers the
    adversarial half of the mixed minibatch; the pairs are always clean)."""

    def loss(logits, labels, key):
        del key
        clean = split_mixed(logits)[0] if mixed else logits
        return {"loss_xent": pass_cross_entropy(logits, labels, label_smoothing, mixed),
                "loss_clp": losses.clean_logit_pairing_loss(clean, weight)}

    return Objective(pgd_craft, loss)


def lsq_objective(label_smoothing: float, weight: float, mixed: bool) -> Objective:
    """Logit squeezing: cross-entropy + ``weight * mean(z^2)`` over every logit of the pass
    (clean, or the whole mixed minibatch with a PGD ``train_adv_method``)."""

    def loss(logits, labels, key):
        del key
        return {"loss_xent": pass_cross_entropy(logits, labels, label_smoothing, mixed),
                "loss_lsq": losses.logit_squeezing_loss(logits, weight)}

    return Objective(pgd_craft, loss)


# TRADES starts its attack at x + 0.001 * N(0, 1) on a [0, 1] pixel scale: at x itself the
# KL term and its gradient are exactly zero and the signed step would never move.
TRADES_START_STD = 0.001


def trades_spec(attack: str | AttackSpec) -> AttackSpec:
    """The parsed spec, if it is a plain ``pgd_EPS_STEP_NITER`` (what TRADES reads)."""
    spec = parse_attack(attack)
    if spec.method != "pgd" or spec.restarts != 1 or spec.loss != "xent" or spec.true_label:
        raise ValueError(
            "TRADES takes eps, step and iterations from a plain pgd_EPS_STEP_NITER spec "
            f"(e.g. pgd_16_2_10), got train_adv_method={spec.spec!r}.")
    return spec


def trades_attack(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                  key: jax.Array, attack: str | AttackSpec,
                  bounds: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """TRADES' inner maximisation: signed-gradient ascent on
    ``sum_i KL(p(x_i) || p(x'_i))`` from ``x + N(0, (0.001 * range)^2)``, projected onto
    the eps-ball and bounds; EPS, STEP and NITER come from a ``pgd_EPS_STEP_NITER`` spec."""
    spec = trades_spec(attack)
    scale = pgd.pixel_scale(bounds)
    eps, step = spec.eps * scale, spec.step * scale
    x0 = jax.lax.stop_gradient(images)
    target = jax.lax.stop_gradient(logits_fn(x0))
    noise = jax.random.normal(key, x0.shape, x0.dtype) * (TRADES_START_STD * 255 * scale)
    x = pgd.project(x0 + noise, x0, eps, bounds)
    objective = lambda x: jnp.sum(losses.kl_divergence(target, logits_fn(x)))
    x = pgd.signed_gradient_loop(objective, x, x0, eps, step, spec.niter, bounds, 1.0)
    return jax.lax.stop_gradient(x)


def trades_craft(model: Any, variables: dict[str, Any], images: jax.Array, labels: jax.Array,
                 key: jax.Array, attack: AttackSpec, bounds: tuple[float, float]) -> jax.Array:
    """TRADES' adversarial examples from the current weights in inference mode."""
    del labels  # TRADES moves away from the model's own clean prediction
    return trades_attack(inference_logits_fn(model, variables), images, key, attack, bounds)


def trades_objective(label_smoothing: float, beta: float, mixed: bool) -> Objective:
    """TRADES (Zhang et al. 2019): cross-entropy on the clean half +
    ``beta * mean_i KL(p(x_i) || p(x'_i))``, both halves from one training-mode pass on the
    mixed minibatch (so BatchNorm statistics cover both, as for ALP)."""
    if not mixed:
        raise ValueError(
            "train_objective='trades' needs adversarial examples: set train_adv_method to a "
            "pgd_EPS_STEP_NITER spec (e.g. pgd_16_2_10) for its eps, step and iterations; "
            "got 'clean'.")

    def loss(logits, labels, key):
        del key
        clean, adv = split_mixed(logits)
        return {"loss_xent": losses.smoothed_cross_entropy(clean, labels, label_smoothing),
                "loss_kl": beta * jnp.mean(losses.kl_divergence(clean, adv))}

    return Objective(trades_craft, loss)


# name -> factory(label_smoothing, weight, mixed) (or "module:function" naming one); the
# weight is the term's coefficient. ``register_objective`` is the one way to add to it.
_REGISTRY: dict[str, str | Callable[[float, float, bool], Objective]] = {
    "alp": alp_objective,
    "clp": clp_objective,
    "lsq": lsq_objective,
    "trades": trades_objective,
}
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def register_objective(name: str, *,
                       factory: str | Callable[[float, float, bool], Objective]) -> None:
    """Adds ``train_objective=name``, as ``alp_jax.attacks.register_family`` adds an
    attack: an explicit call (nothing registers on import), a taken name refused naming
    it. ``factory(label_smoothing, weight, mixed) -> Objective`` (or a
    ``"module:function"`` string naming it, imported on first use) builds the objective;
    ``weight`` comes from ``objective_weight``, ``mixed`` is True when
    ``train_adv_method`` is not ``clean``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"register_objective: name must be lowercase letters, digits and "
                         f"'_', starting with a letter, got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(f"register_objective: the objective {name!r} is already taken; "
                         f"choose another name (taken: {', '.join(sorted(_REGISTRY))}).")
    if not callable(factory) and not (isinstance(factory, str) and ":" in factory):
        raise ValueError(f"register_objective({name!r}): factory must be a callable or a "
                         f"'module:function' string, got {factory!r}.")
    _REGISTRY[name] = factory


def make_objective(name: str, attack: str | AttackSpec, *, label_smoothing: float = 0.1,
                   weight: float = 0.0) -> Objective:
    """The objective ``name`` (``alp``, ``clp``, ``lsq``, ``trades``, or a registered one)
    for training with ``attack`` (``clean`` trains on clean images only); ``weight`` is
    its extra term's coefficient (ALP's logit-pairing weight, CLP's, LSQ's, TRADES' beta).
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown train_objective {name!r}; valid: {', '.join(sorted(_REGISTRY))}.")
    spec = parse_attack(attack)
    if name == "trades" and not spec.is_clean:
        trades_spec(spec)  # the spec's error now, not when the step is traced
    factory = resolve(_REGISTRY[name], f"train_objective {name!r}")
    return factory(label_smoothing, weight, not spec.is_clean)


def weight_field(name: str) -> str:
    """The config field holding objective ``name``'s weight: the original's
    ``train_lp_weight`` for ``alp``, ``objective_weight`` for the others."""
    return "train_lp_weight" if name == "alp" else "objective_weight"


def get_objective(config: Any) -> Objective:
    """``make_objective`` with a config's ``train_objective`` (default ``alp``),
    ``train_adv_method``, ``label_smoothing`` and weight (``weight_field``)."""
    name = config.get("train_objective", "alp")
    return make_objective(name, config.train_adv_method,
                          label_smoothing=config.label_smoothing,
                          weight=getattr(config, weight_field(name), 0.0))
