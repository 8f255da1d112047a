"""A faster inference-mode forward pass of ``alp_jax.model.ResNetV2`` for attacks (opt-in).

PGD spends most of an ALP step in inference-mode forward and input-gradient passes. This
module computes the same logits as ``model.apply(variables, x, train=False)`` from the
same variable tree, with two changes that only reorder floating-point work:

- **BatchNorm folding**: a ``conv -> BatchNorm`` pair (``conv1``, ``conv2`` of every
  bottleneck) becomes one convolution with weights ``W * scale`` and bias
  ``beta - mean * scale`` (``scale = gamma / sqrt(var + eps)``), so the attack's forward
  and backward passes skip one elementwise pass per layer.
- **Convolutions as matmuls** (``conv2d``): when a kernel is larger than its input in a
  spatial dimension (ResNet-v2-50's 3x3 convolutions in block4 at 64x64 input see 2x2
  maps), XLA's CPU compiler swaps the convolution's operands and runs the result as a
  naive loop, about 70x slower than a matmul of the same size. ``conv2d`` writes such
  convolutions as an explicit im2col (pad, k*k strided slices, concatenate) and one
  ``dot``; on the CPU backend it does so for every convolution (``conv_impl='auto'``),
  since XLA's CPU matmuls are faster than its convolution kernels.

In float32 the logits agree with ``model.apply`` to rounding (about 1e-6 relative);
``sign()`` of an attack gradient can flip where a gradient component is ~0, so attacked
images agree on all but a tiny fraction of pixels, not bit for bit.

Usage::

    logits_fn = fast_logits_fn(model, variables)        # for generate_adversarial_examples
    config.train_objective = "alp_fast"                 # ALP whose attack uses it

``import alp_jax.fast_inference`` registers the ``alp_fast`` objective (the ``alp``
objective with this forward pass in its attack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from alp_jax import objectives
from alp_jax.convolution import (  # noqa: F401  (re-exported: the attack's convolutions)
    CONV_IMPLS,
    Padding,
    conv2d,
    im2col_conv,
    kernel_exceeds_input,
)
from alp_jax.model import BN_EPSILON, ResNetV2
from alp_jax.pgd import AttackSpec, generate_adversarial_examples

# ---- BatchNorm folding --------------------------------------------------------------------

def bn_scale_shift(bn_params: dict[str, Any], bn_stats: dict[str, Any],
                   epsilon: float = BN_EPSILON) -> tuple[jax.Array, jax.Array]:
    """Inference-mode BatchNorm as ``x * scale + shift`` (as ``model.BatchNorm`` computes it)."""
    scale = bn_params["gamma"] * jax.lax.rsqrt(bn_stats["moving_variance"] + epsilon)
    return scale, bn_params["beta"] - bn_stats["moving_mean"] * scale


def _layer(params: dict[str, Any], stats: dict[str, Any] | None, fold: bool,
           epsilon: float) -> dict[str, jax.Array]:
    """One conv scope as ``{'w', 'b'}`` (+ ``'scale', 'shift'`` of an unfolded BatchNorm)."""
    out = {"w": params["weights"]}
    if "biases" in params:
        out["b"] = params["biases"]
    if "BatchNorm" in params:
        scale, shift = bn_scale_shift(params["BatchNorm"], stats["BatchNorm"], epsilon)
        if fold:
            out["w"] = params["weights"] * scale
            out["b"] = shift
        else:
            out["scale"], out["shift"] = scale, shift
    return out


def fold_batch_norm(variables: dict[str, Any], *, fold: bool = True,
                    epsilon: float = BN_EPSILON) -> dict[str, Any]:
    """Inference-mode parameters of a ResNetV2 variable tree, BatchNorm folded into convs.

    Returns a tree of the same scopes: every conv scope becomes ``{'w', 'b'}`` (its
    BatchNorm folded in when ``fold``, else kept as ``'scale'``/``'shift'``); every
    standalone BatchNorm (``preact``, ``postnorm``) becomes ``{'scale', 'shift'}``.
    """
    def walk(p: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
        if "weights" in p:
            return _layer(p, s, fold, epsilon)
        if "gamma" in p:
            scale, shift = bn_scale_shift(p, s, epsilon)
            return {"scale": scale, "shift": shift}
        return {k: walk(v, (s or {}).get(k, {})) for k, v in p.items()}

    return walk(variables["params"], variables.get("batch_stats", {}))


# ---- the forward pass ---------------------------------------------------------------------

def _conv_layer(x: jax.Array, layer: dict[str, jax.Array], stride: int, same: bool,
                dtype: Any, impl: str, relu: bool) -> jax.Array:
    k = layer["w"].shape[0]
    if same and stride > 1:  # resnet_utils.conv2d_same
        pad: Padding = [((k - 1) // 2, k - 1 - (k - 1) // 2)] * 2
    else:
        pad = "SAME"
    y = conv2d(x.astype(dtype), layer["w"].astype(dtype), stride, pad, impl)
    if "scale" in layer:  # unfolded BatchNorm (+ ReLU), as model.BatchNorm
        y = y.astype(jnp.float32) * layer["scale"] + layer["shift"]
        y = (jax.nn.relu(y) if relu else y).astype(dtype)
    elif "b" in layer:
        y = y + layer["b"].astype(dtype)
        y = jax.nn.relu(y) if relu else y
    return y


def _norm_relu(x: jax.Array, bn: dict[str, jax.Array], dtype: Any) -> jax.Array:
    return jax.nn.relu(x.astype(jnp.float32) * bn["scale"] + bn["shift"]).astype(dtype)


def inference_apply(model: ResNetV2, folded: dict[str, Any], images: jax.Array, *,
                    conv_impl: str = "auto") -> jax.Array:
    """Logits of ``model`` in inference mode from ``fold_batch_norm(variables)``."""
    dt = model.dtype
    p = folded[model.scope_name]
    x = _conv_layer(images, p["conv1"], model.root_stride, True, dt, conv_impl, relu=False)
    if model.root_pool:
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    for b, spec in enumerate(model.blocks):
        for i in range(spec.num_units):
            u = p[f"block{b + 1}"][f"unit_{i + 1}"]["bottleneck_v2"]
            stride = spec.stride if i == spec.num_units - 1 else 1
            preact = _norm_relu(x, u["preact"], dt)
            if "shortcut" in u:
                shortcut = _conv_layer(preact, u["shortcut"], stride, False, dt, conv_impl,
                                       relu=False)
            else:
                shortcut = x if stride == 1 else x[:, ::stride, ::stride, :]
            r = _conv_layer(preact, u["conv1"], 1, False, dt, conv_impl, relu=True)
            r = _conv_layer(r, u["conv2"], stride, True, dt, conv_impl, relu=True)
            r = _conv_layer(r, u["conv3"], 1, False, dt, conv_impl, relu=False)
            x = shortcut.astype(dt) + r
    x = _norm_relu(x, p["postnorm"], dt)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    x = _conv_layer(x, p["logits"], 1, False, jnp.float32, conv_impl, relu=False)
    return x[:, 0, 0, :]


def fast_logits_fn(model: ResNetV2, variables: dict[str, Any], *, fold_bn: bool = True,
                   conv_impl: str = "auto") -> Callable[[jax.Array], jax.Array]:
    """Inference-mode logits for attacks (no gradient into ``variables``)."""
    if not isinstance(model, ResNetV2):
        raise TypeError(f"fast_logits_fn needs an alp_jax.model.ResNetV2, got {type(model)}")
    folded = fold_batch_norm(jax.lax.stop_gradient(variables), fold=fold_bn)
    return lambda x: inference_apply(model, folded, x, conv_impl=conv_impl)


# ---- the alp_fast objective ---------------------------------------------------------------

def fast_pgd_craft(fold_bn: bool = True, conv_impl: str = "auto") -> Callable[..., Any]:
    """``Objective.craft`` of ``alp`` with the attack on ``fast_logits_fn``."""

    def craft(model: Any, variables: dict[str, Any], images: jax.Array, labels: jax.Array,
              key: jax.Array, attack: AttackSpec, bounds: tuple[float, float]
              ) -> jax.Array | None:
        if attack.is_clean:
            return None
        logits_fn = fast_logits_fn(model, variables, fold_bn=fold_bn, conv_impl=conv_impl)
        return generate_adversarial_examples(logits_fn, images, key, attack, bounds,
                                             labels=labels)

    return craft


def _alp_fast(config: Any, mixed: bool) -> objectives.Objective:
    base = objectives.alp_objective(config.label_smoothing, config.train_lp_weight, mixed)
    craft = fast_pgd_craft(bool(config.get("fast_attack_fold_bn", True)),
                           str(config.get("fast_attack_conv_impl", "auto")))
    return dataclasses.replace(base, craft=craft)


objectives.register_objective("alp_fast", _alp_fast)
