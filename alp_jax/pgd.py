"""PGD attacks of the original release, and the registry every attack spec goes through.

Spec strings: ``clean``, ``pgd_EPS_STEP_NITER`` (untargeted, against the model's own
prediction), ``pgdll_EPS_STEP_NITER`` (towards the least likely class),
``pgdrnd_EPS_STEP_NITER`` (towards a uniformly random class). EPS and STEP are integers
on the 0..255 scale, rescaled by ``(hi - lo) / 255`` for pixel bounds ``(lo, hi)``.

Attacks are pure functions built from small parts (label choice, objective, signed
step, projection) with a ``lax.fori_loop``, so compile time does not grow with NITER and
the whole attack works under ``jit`` and ``vmap``. Other modules add attack families
with ``register_attack``; ``parse_attack`` and ``generate_adversarial_examples`` accept
every registered spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from alp_jax.losses import softmax_cross_entropy

LogitsFn = Callable[[jax.Array], jax.Array]
Bounds = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A parsed attack spec. ``eps`` and ``step`` are on the 0..255 scale."""

    method: str
    eps: float = 0.0
    step: float = 0.0
    niter: int = 0
    restarts: int = 1
    true_label: bool = False  # attack the true label instead of the model's prediction
    spec: str = "clean"
    # Used by the families in alp_jax.attacks; the original methods leave the defaults.
    loss: str = "xent"  # objective: xent, cw (margin), dlr, margin (Square)
    targets: int = 0  # > 0: targeted runs at each of the top-``targets`` other classes

    @property
    def is_clean(self) -> bool:
        return self.method == "clean"

    def __str__(self) -> str:
        return self.spec


class AttackFn(Protocol):
    def __call__(self, logits_fn: LogitsFn, images: jax.Array, key: jax.Array,
                 spec: AttackSpec, *, bounds: Bounds, random_start: bool,
                 labels: jax.Array | None) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class AttackFamily:
    """How to parse and run one attack method (the first ``_``-field of a spec)."""

    forms: tuple[str, ...]
    parse: Callable[[str, list[str]], AttackSpec]
    run: AttackFn


_FAMILIES: dict[str, AttackFamily] = {}


def register_attack(method: str, family: AttackFamily) -> None:
    """Makes ``method_...`` specs valid everywhere an attack is accepted."""
    _FAMILIES[method] = family


def valid_forms() -> list[str]:
    return ["clean"] + [f for fam in _FAMILIES.values() for f in fam.forms]


def _spec_error(spec: str, why: str) -> ValueError:
    return ValueError(f"Invalid attack spec {spec!r}: {why}. Valid forms: "
                      f"{', '.join(valid_forms())} (EPS and STEP integers on the 0..255 "
                      "scale, NITER a positive integer).")


def parse_int(spec: str, field: str, what: str, minimum: int = 1,
              maximum: int | None = None) -> int:
    """One integer field of a spec, with an error that names the spec."""
    if not (field.isascii() and field.isdigit()):  # str.isdigit also accepts e.g. '²'
        raise _spec_error(spec, f"{what} must be an integer, got {field!r}")
    value = int(field)
    if value < minimum or (maximum is not None and value > maximum):
        rng = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise _spec_error(spec, f"{what} must be in {rng}, got {value}")
    return value


def parse_attack(spec: str | AttackSpec) -> AttackSpec:
    """Parses ``clean`` / ``NAME_EPS_STEP_NITER`` (and registered forms) into an AttackSpec."""
    if isinstance(spec, AttackSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"attack spec must be a string or AttackSpec, got {type(spec).__name__}")
    s = spec.strip()
    if s == "clean":
        return AttackSpec("clean")
    method, *fields = s.split("_")
    if method not in _FAMILIES:
        raise _spec_error(spec, f"unknown method {method!r}")
    return _FAMILIES[method].parse(s, fields)


def _parse_pgd(spec: str, fields: list[str]) -> AttackSpec:
    if len(fields) != 3:
        raise _spec_error(spec, "expected NAME_EPS_STEP_NITER")
    # The original takes any integers; 0 is meaningful here: EPS 0 runs the clean images
    # through the attack path (a sanity check), NITER 0 is the random start alone (uniform
    # noise in the ball).
    eps = parse_int(spec, fields[0], "EPS", 0, 255)
    step = parse_int(spec, fields[1], "STEP", 0, 255)
    niter = parse_int(spec, fields[2], "NITER", 0)
    return AttackSpec(spec.split("_")[0], eps, step, niter, spec=spec)


# ---- parts ------------------------------------------------------------------------------

def pixel_scale(bounds: Bounds) -> float:
    """Size of one 0..255 unit in model input units."""
    return (bounds[1] - bounds[0]) / 255.0


def project(x: jax.Array, x0: jax.Array, eps: float | jax.Array, bounds: Bounds) -> jax.Array:
    """Clip into the L-inf eps-ball around ``x0``, then into the pixel bounds."""
    return jnp.clip(jnp.clip(x, x0 - eps, x0 + eps), bounds[0], bounds[1])


def random_start(key: jax.Array, x0: jax.Array, eps: float | jax.Array,
                 bounds: Bounds) -> jax.Array:
    """``x0 + U(-eps, eps)``, projected."""
    noise = jax.random.uniform(key, x0.shape, x0.dtype, -1.0, 1.0) * eps
    return project(x0 + noise, x0, eps, bounds)


def choose_labels(method: str, clean_logits: jax.Array, key: jax.Array,
                  labels: jax.Array | None = None) -> tuple[jax.Array, bool]:
    """(labels or targets, targeted) as the original chose them for each PGD method.

    ``pgd`` uses the model's own prediction unless true ``labels`` are given.
    """
    if method == "pgd":
        return (labels if labels is not None else jnp.argmax(clean_logits, -1)), False
    if method == "pgdll":
        return jnp.argmin(clean_logits, -1), True
    if method == "pgdrnd":
        n, num_classes = clean_logits.shape
        return jax.random.randint(key, (n,), 0, num_classes), True
    raise ValueError(f"choose_labels: unknown PGD method {method!r}")


def summed_xent(logits_fn: LogitsFn, labels: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """The original attack objective: cross-entropy summed over the batch."""
    return lambda x: jnp.sum(softmax_cross_entropy(logits_fn(x), labels))


def signed_gradient_loop(objective: Callable[[jax.Array], jax.Array], x_init: jax.Array,
                         x0: jax.Array, eps: float | jax.Array, step: float | jax.Array,
                         niter: int, bounds: Bounds, direction: float) -> jax.Array:
    """``niter`` steps of ``x <- project(x + direction*step*sign(grad objective))``."""
    grad_fn = jax.grad(objective)

    def body(_, x):
        x = x + direction * step * jnp.sign(grad_fn(x))
        return project(x, x0, eps, bounds)

    return jax.lax.fori_loop(0, niter, body, x_init)


# ---- PGD --------------------------------------------------------------------------------

def run_pgd(logits_fn: LogitsFn, images: jax.Array, key: jax.Array, spec: AttackSpec, *,
            bounds: Bounds = (-1.0, 1.0), random_start: bool = True,
            labels: jax.Array | None = None) -> jax.Array:
    """The original PGD (``pgd``, ``pgdll``, ``pgdrnd``) for one start."""
    scale = pixel_scale(bounds)
    eps, step = spec.eps * scale, spec.step * scale
    k_start, k_target = jax.random.split(key)
    x0 = jax.lax.stop_gradient(images)
    if spec.true_label and labels is None:
        raise ValueError(f"Attack {spec.spec!r} attacks the true label; pass labels=.")
    labels = labels if spec.true_label else None
    needs_clean = spec.method != "pgdrnd" and not (spec.method == "pgd" and labels is not None)
    clean_logits = logits_fn(x0) if needs_clean else jnp.zeros(
        jax.eval_shape(logits_fn, x0).shape, jnp.float32)
    targets, targeted = choose_labels(spec.method, clean_logits, k_target, labels)
    x = _start(k_start, x0, eps, bounds, random_start)
    x = signed_gradient_loop(summed_xent(logits_fn, targets), x, x0, eps, step, spec.niter,
                             bounds, -1.0 if targeted else 1.0)
    return jax.lax.stop_gradient(x)


def _start(key: jax.Array, x0: jax.Array, eps: float, bounds: Bounds,
           use_random: bool) -> jax.Array:
    if use_random:
        return random_start(key, x0, eps, bounds)
    return project(x0, x0, eps, bounds)


for _m in ("pgd", "pgdll", "pgdrnd"):
    register_attack(_m, AttackFamily((f"{_m}_EPS_STEP_NITER",), _parse_pgd, run_pgd))


def generate_adversarial_examples(
    logits_fn: LogitsFn,
    images: jax.Array,
    key: jax.Array,
    attack: str | AttackSpec,
    bounds: Bounds = (-1.0, 1.0),
    random_start: bool = True,
    labels: jax.Array | None = None,
) -> jax.Array:
    """Adversarial versions of ``images`` for ``attack`` (a spec string or AttackSpec).

    ``logits_fn`` maps images to logits and should run the model in inference mode; no
    gradient flows from the result into anything ``logits_fn`` closes over.
    ``random_start=False`` starts at the clean images (for exact comparisons).
    ``labels`` (true labels) are used only by specs that attack the true label; the
    original methods use the model's own predictions.
    """
    spec = parse_attack(attack)
    if spec.is_clean:
        return images
    return _FAMILIES[spec.method].run(logits_fn, images, key, spec, bounds=tuple(bounds),
                                      random_start=random_start, labels=labels)
