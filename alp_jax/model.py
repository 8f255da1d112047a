"""ResNet-v2 (pre-activation) as TF-slim's ``resnet_v2`` builds it, in Flax Linen.

The parameter tree mirrors TF-slim's variable names exactly: the model's scope
(``resnet_v2_50``) is the top-level module, modules are named like slim scopes and
leaves are named like slim variables (``weights``, ``biases``, ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``). So ``resnet_v2_50/block1/unit_1/bottleneck_v2/
conv1/BatchNorm/gamma`` is ``params['resnet_v2_50']['block1']['unit_1']['bottleneck_v2']
['conv1']['BatchNorm']['gamma']`` and the name mapping (``alp_jax.slim_names``) is a
plain path join. Scope prefixes select the same variables on both sides.

Usage::

    model = resnet_v2_50(num_classes=1001)
    variables = model.init(key, images, train=False)
    logits = model.apply(variables, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alp_jax.convolution import check_impl, conv2d

Dtype = Any

BN_DECAY = 0.997
# TF-slim asks for epsilon 1e-5, but slim's batch_norm uses the fused kernel, and in TF 1.x
# (the release used 1.8) tf.nn.fused_batch_norm raised any epsilon below 1.001e-5 to
# 1.001e-5 (a cuDNN requirement). The released models computed with 1.001e-5; so do we.
# Recent TF 2 (2.21 checked) no longer clamps: ~1e-9 relative at normal variances.
BN_EPSILON = 1.001e-5


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One ResNet block: ``num_units`` bottlenecks of width ``base_depth`` (output 4x)."""

    base_depth: int
    num_units: int
    stride: int


class BatchNorm(nn.Module):
    """TF-slim's (fused) batch norm: scale and offset, decay 0.997.

    Training mode normalises with the biased batch variance but, like TF's fused
    kernel, updates ``moving_variance`` with the Bessel-corrected (unbiased) one.
    ``group_size`` > 0 computes statistics over groups of that many consecutive
    examples instead of the whole (global) batch, as per-replica workers did.
    """

    decay: float = BN_DECAY
    epsilon: float = BN_EPSILON
    group_size: int = 0
    activation: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (c,), jnp.float32)
        moving_mean = self.variable(
            "batch_stats", "moving_mean", lambda: jnp.zeros((c,), jnp.float32))
        moving_var = self.variable(
            "batch_stats", "moving_variance", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            batch = x.shape[0]
            group = self.group_size if 0 < self.group_size < batch else batch
            if batch % group:
                raise ValueError(
                    f"BatchNorm group_size {group} does not divide the batch {batch}.")
            xg = xf.reshape((batch // group, group) + x.shape[1:])
            axes = tuple(range(1, xg.ndim - 1))
            mean = jnp.mean(xg, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
            y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            y = y * gamma + beta
            if not self.is_initializing():
                n = group * x.shape[1] * x.shape[2] if x.ndim == 4 else group
                mean_c = jnp.mean(mean.reshape(-1, c), axis=0)
                var_c = jnp.mean(var.reshape(-1, c), axis=0) * (n / max(n - 1, 1))
                moving_mean.value = self.decay * moving_mean.value + (1 - self.decay) * mean_c
                moving_var.value = self.decay * moving_var.value + (1 - self.decay) * var_c
        else:
            # Fold the statistics into one scale and shift: one multiply-add per element.
            scale = gamma * jax.lax.rsqrt(moving_var.value + self.epsilon)
            y = xf * scale + (beta - moving_mean.value * scale)
        if self.activation:
            y = jax.nn.relu(y)
        return y.astype(self.dtype)


class Conv(nn.Module):
    """slim.conv2d (HWIO ``weights``, optional ``biases``), optionally followed by BatchNorm.

    ``same_padding=True`` with stride > 1 reproduces resnet_utils.conv2d_same: explicit
    zero padding of (k-1)//2 before and the rest after, then a VALID convolution.
    """

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = False
    batch_norm: bool = False
    conv2d_same: bool = False
    bn_group_size: int = 0
    bn_decay: float = BN_DECAY
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # see alp_jax.convolution.conv2d

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "weights", nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
            (k, k, x.shape[-1], self.features), jnp.float32)
        if self.conv2d_same and self.stride > 1:
            pad_total = k - 1
            pad = [(pad_total // 2, pad_total - pad_total // 2)] * 2
        else:
            pad = "SAME"
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad,
                   impl=self.conv_impl)
        if self.use_bias:
            bias = self.param("biases", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        if self.batch_norm:
            y = BatchNorm(self.bn_decay, group_size=self.bn_group_size, dtype=self.dtype,
                          name="BatchNorm")(y, train)
        return y


def _subsample(x: jax.Array, stride: int) -> jax.Array:
    # slim's 1x1 max pool with a stride is plain strided slicing.
    return x if stride == 1 else x[:, ::stride, ::stride, :]


class BottleneckV2(nn.Module):
    """resnet_v2.bottleneck: pre-activation bottleneck unit (scope ``bottleneck_v2``)."""

    depth: int
    depth_bottleneck: int
    stride: int
    bn_group_size: int = 0
    bn_decay: float = BN_DECAY
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        g, d, dt, ci = self.bn_group_size, self.bn_decay, self.dtype, self.conv_impl
        preact = BatchNorm(d, group_size=g, dtype=dt, name="preact")(x, train)
        if x.shape[-1] == self.depth:
            shortcut = _subsample(x, self.stride)
        else:
            shortcut = Conv(self.depth, 1, self.stride, use_bias=True, dtype=dt,
                            conv_impl=ci, name="shortcut")(preact, train)
        r = Conv(self.depth_bottleneck, 1, 1, batch_norm=True, bn_group_size=g, bn_decay=d,
                 dtype=dt, conv_impl=ci, name="conv1")(preact, train)
        r = Conv(self.depth_bottleneck, 3, self.stride, batch_norm=True, conv2d_same=True,
                 bn_group_size=g, bn_decay=d, dtype=dt, conv_impl=ci, name="conv2")(r, train)
        r = Conv(self.depth, 1, 1, use_bias=True, dtype=dt, conv_impl=ci, name="conv3")(
            r, train)
        return shortcut.astype(dt) + r


class _Block(nn.Module):
    spec: BlockSpec
    bn_group_size: int
    bn_decay: float
    dtype: Dtype
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.spec
        for i in range(s.num_units):
            stride = s.stride if i == s.num_units - 1 else 1  # stride on the LAST unit
            x = _Unit(s.base_depth * 4, s.base_depth, stride, self.bn_group_size,
                      self.bn_decay, self.dtype, self.conv_impl, name=f"unit_{i + 1}")(x, train)
        return x


class _Unit(nn.Module):
    depth: int
    depth_bottleneck: int
    stride: int
    bn_group_size: int
    bn_decay: float
    dtype: Dtype
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return BottleneckV2(self.depth, self.depth_bottleneck, self.stride, self.bn_group_size,
                            self.bn_decay, self.dtype, self.conv_impl,
                            name="bottleneck_v2")(x, train)


class _ResNetV2Body(nn.Module):
    num_classes: int
    blocks: Sequence[BlockSpec]
    root_depth: int
    root_kernel: int
    root_stride: int
    root_pool: bool
    bn_group_size: int
    bn_decay: float
    dtype: Dtype
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.root_depth, self.root_kernel, self.root_stride, use_bias=True,
                 conv2d_same=True, dtype=self.dtype, conv_impl=self.conv_impl,
                 name="conv1")(x, train)
        if self.root_pool:
            # resnet_arg_scope makes slim.max_pool2d use SAME padding.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, spec in enumerate(self.blocks):
            x = _Block(spec, self.bn_group_size, self.bn_decay, self.dtype, self.conv_impl,
                       name=f"block{i + 1}")(x, train)
        x = BatchNorm(self.bn_decay, group_size=self.bn_group_size, dtype=self.dtype,
                      name="postnorm")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        x = Conv(self.num_classes, 1, 1, use_bias=True, dtype=jnp.float32,
                 conv_impl=self.conv_impl, name="logits")(x, train)
        return x[:, 0, 0, :]


class ResNetV2(nn.Module):
    """TF-slim ResNet-v2 with logits; the parameter tree is rooted at ``scope``.

    Attributes:
      num_classes: number of logits (1001 for ImageNet with background, 200 for Tiny).
      blocks: the block specs (see ``resnet_v2_50``).
      scope_name: top-level name, the TF-slim model scope (e.g. ``resnet_v2_50``).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and BatchNorm statistics
        stay float32 and logits are float32.
      bn_group_size: 0 for statistics over the whole (global) batch, N > 0 for
        statistics over groups of N consecutive examples.
      bn_decay: decay of the BatchNorm moving statistics (TF-slim: 0.997).
      conv_impl: how convolutions lower (``alp_jax.convolution.conv2d``): ``xla``
        (``lax.conv``), ``im2col`` (matmuls; faster on CPU) or ``auto`` (im2col on CPU
        only). The parameters and, to float rounding, the results are the same.
    """

    num_classes: int
    blocks: Sequence[BlockSpec]
    scope_name: str
    root_depth: int = 64
    root_kernel: int = 7
    root_stride: int = 2
    root_pool: bool = True
    bn_group_size: int = 0
    bn_decay: float = BN_DECAY
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        return _ResNetV2Body(
            self.num_classes, tuple(self.blocks), self.root_depth, self.root_kernel,
            self.root_stride, self.root_pool, self.bn_group_size, self.bn_decay, self.dtype,
            self.conv_impl, name=self.scope_name)(images, train)


def _standard(depth: int, units: Sequence[int]):
    blocks = tuple(BlockSpec(b, u, s) for b, u, s in zip((64, 128, 256, 512), units,
                                                           (2, 2, 2, 1), strict=True))

    def build(num_classes: int, *, dtype: Dtype = jnp.float32, bn_group_size: int = 0,
              bn_decay: float = BN_DECAY, scope: str | None = None,
              conv_impl: str = "xla") -> ResNetV2:
        return ResNetV2(num_classes, blocks, scope or f"resnet_v2_{depth}",
                        bn_group_size=bn_group_size, bn_decay=bn_decay, dtype=dtype,
                        conv_impl=check_impl(conv_impl))

    build.__name__ = f"resnet_v2_{depth}"
    build.__doc__ = f"TF-slim resnet_v2_{depth} (units {tuple(units)}) with logits."
    return build


resnet_v2_50 = _standard(50, (3, 4, 6, 3))
resnet_v2_101 = _standard(101, (3, 4, 23, 3))
resnet_v2_152 = _standard(152, (3, 8, 36, 3))
resnet_v2_200 = _standard(200, (3, 24, 36, 3))


def resnet_v2_small(num_classes: int, *, dtype: Dtype = jnp.float32, bn_group_size: int = 0,
                    bn_decay: float = BN_DECAY, scope: str | None = None,
                    conv_impl: str = "xla") -> ResNetV2:
    """A narrow ResNet-v2 for CPU demos and tests (~0.5M parameters).

    Same unit structure and naming as resnet_v2_50, one unit per block, base depths
    16/32/64/128, and a 3x3 stride-1 root without max pool so that small images
    (e.g. 32x32 digits) keep some spatial extent.
    """
    blocks = (BlockSpec(16, 1, 2), BlockSpec(32, 1, 2), BlockSpec(64, 1, 2),
              BlockSpec(128, 1, 1))
    return ResNetV2(num_classes, blocks, scope or "resnet_v2_small", root_depth=32,
                    root_kernel=3, root_stride=1, root_pool=False,
                    bn_group_size=bn_group_size, bn_decay=bn_decay, dtype=dtype,
                    conv_impl=check_impl(conv_impl))


MODELS = {
    "resnet_v2_50": resnet_v2_50,
    "resnet_v2_101": resnet_v2_101,
    "resnet_v2_152": resnet_v2_152,
    "resnet_v2_200": resnet_v2_200,
    "resnet_v2_small": resnet_v2_small,
}


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_model(name: str, *, dtype: Dtype | str = "float32", conv_impl: str = "xla") -> None:
    """ValueError naming a model name, compute dtype or conv_impl that does not exist."""
    if name not in MODELS:
        raise ValueError(f"Unknown model_name {name!r}; valid names: {', '.join(MODELS)}.")
    if jnp.dtype(dtype).name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {jnp.dtype(dtype).name!r}; valid: "
                         f"{', '.join(COMPUTE_DTYPES)}.")
    check_impl(conv_impl)


def create_model(name: str, num_classes: int, *, dtype: Dtype | str = jnp.float32,
                 bn_group_size: int = 0, bn_decay: float = BN_DECAY,
                 conv_impl: str = "xla") -> ResNetV2:
    """Builds a model by name (``resnet_v2_50``, ..., ``resnet_v2_small``)."""
    check_model(name, dtype=dtype, conv_impl=conv_impl)
    return MODELS[name](num_classes, dtype=jnp.dtype(dtype), bn_group_size=bn_group_size,
                        bn_decay=bn_decay, conv_impl=conv_impl)


def model_from_config(cfg: Any) -> ResNetV2:
    """``create_model`` with a config's ``model_name``, ``num_classes``, ``compute_dtype``,
    ``bn_group_size``, ``bn_decay`` and ``conv_impl`` (training, evaluation and the
    robustness suite build their model here)."""
    return create_model(cfg.model_name, cfg.num_classes, dtype=cfg.compute_dtype,
                        bn_group_size=cfg.bn_group_size, bn_decay=cfg.bn_decay,
                        conv_impl=cfg.conv_impl)
