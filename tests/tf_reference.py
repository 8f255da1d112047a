"""TensorFlow references for parity tests: TF-slim's ResNet-v2 and the original PGD.

Only tests import this module. ``load_tf_slim()`` imports TensorFlow and tf_slim with the
shim TF 2.21 needs (tf_slim's batch norm lazily loads ``tf_keras.legacy_tf_layers``,
which tf-keras 2.21 only ships as ``tf_keras.src.legacy_tf_layers``). Everything here is
TF1-style graph mode, as the original release ran.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_tf_slim() -> tuple[Any, Any, Any]:
    """``(tf, slim, resnet_v2)`` with the tf-keras shim installed (idempotent)."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras

    try:
        importlib.import_module("tf_keras.legacy_tf_layers.normalization")
    except ImportError:  # tf-keras >= 2.16 keeps them under tf_keras.src only
        legacy = importlib.import_module("tf_keras.src.legacy_tf_layers")
        sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy)
        tf_keras.legacy_tf_layers = legacy
        # Alias the submodules too, so that nothing is loaded twice under two names.
        for sub in ("base", "normalization", "core", "convolutional", "pooling",
                    "variable_scope_shim"):
            try:
                mod = importlib.import_module(f"tf_keras.src.legacy_tf_layers.{sub}")
            except ImportError:
                continue
            sys.modules.setdefault(f"tf_keras.legacy_tf_layers.{sub}", mod)
    import tf_slim as slim
    from tf_slim.nets import resnet_v2

    return tf, slim, resnet_v2


def slim_model_fn(model_name: str, num_classes: int) -> Callable[[Any], Any]:
    """The original's ``model_lib.get_model``: logits ``[batch, classes]``, inference mode.

    Variables are shared between calls (``reuse=tf.AUTO_REUSE``), as in the release.
    """
    tf, slim, resnet_v2 = load_tf_slim()
    fn = getattr(resnet_v2, model_name)

    def model(images: Any, is_training: bool = False) -> Any:
        with slim.arg_scope(resnet_v2.resnet_arg_scope()):
            logits, _ = fn(images, num_classes, is_training=is_training,
                           reuse=tf.compat.v1.AUTO_REUSE)
        return tf.reshape(logits, [-1, num_classes])

    return model


def random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random value for one slim variable, chosen so that logits are not degenerate.

    Conv kernels: He-scaled normal (residual ``conv3`` and shortcut kernels scaled down so
    activations stay moderate through the pre-activation stack); gamma and
    moving_variance ~ U(0.5, 1.5); beta, moving_mean and biases ~ N(0, 0.1).
    """
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "weights":
        fan_in = int(np.prod(shape[:-1]))
        std = np.sqrt(2.0 / fan_in)
        if "/conv3/" in name or "/shortcut/" in name:
            std *= 0.5
        value = rng.normal(0.0, std, shape)
    elif leaf in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, shape)
    elif leaf in ("beta", "moving_mean", "biases"):
        value = rng.normal(0.0, 0.1, shape)
    else:
        raise ValueError(f"random_value: unexpected variable {name!r}")
    return value.astype(np.float32)


def random_values(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """``{slim name: random_value}`` for ``{slim name: shape}``, reproducibly."""
    rng = np.random.default_rng(seed)
    return {name: random_value(name, tuple(shape), rng) for name, shape in sorted(shapes.items())}


def assign(sess: Any, pairs: list[tuple[Any, np.ndarray]]) -> None:
    """Assigns ``[(tf variable, value), ...]`` in one run (values fed, not in the graph)."""
    tf, _, _ = load_tf_slim()
    with sess.graph.as_default():
        phs = [tf.compat.v1.placeholder(v.dtype.base_dtype, v.shape) for v, _ in pairs]
        ops = [v.assign(ph) for (v, _), ph in zip(pairs, phs, strict=True)]
    sess.run(ops, feed_dict={ph: value for ph, (_, value) in zip(phs, pairs, strict=True)})


def pgd_graph(x: Any, model_fn: Callable[[Any], Any], method: str, eps: int, step: int,
              niter: int, bounds: tuple[float, float] = (-1.0, 1.0),
              random_start: bool = False) -> Any:
    """The release's PGD (``adversarial_attack.generate_pgd*``) as a graph op.

    ``method`` is ``pgd`` (label: argmax of the clean logits, ascend) or ``pgdll``
    (target: argmin, descend). The loss is the batch SUM of softmax cross-entropy; each
    step is ``x + s*step*sign(grad)`` clipped to ``[x0-eps, x0+eps]`` within bounds, in a
    ``tf.while_loop``. ``random_start=False`` starts at ``x`` (the release always added
    uniform noise; the tests need a deterministic start).
    """
    tf, _, _ = load_tf_slim()
    scale = (bounds[1] - bounds[0]) / 255.0
    epsilon, step_size = float(eps) * scale, float(step) * scale
    logits = model_fn(x)
    num_classes = tf.shape(logits)[1]
    if method == "pgd":
        one_hot = tf.one_hot(tf.argmax(logits, axis=1), num_classes)
        multiplier = 1.0
    elif method == "pgdll":
        one_hot = tf.one_hot(tf.argmin(logits, axis=1), num_classes)
        multiplier = -1.0
    else:
        raise ValueError(f"pgd_graph: unknown method {method!r}")
    clip_min = tf.maximum(x - epsilon, bounds[0])
    clip_max = tf.minimum(x + epsilon, bounds[1])
    start = x
    if random_start:
        start = x + tf.random.uniform(tf.shape(x), -epsilon, epsilon)
    start = tf.clip_by_value(start, clip_min, clip_max)

    def cond(index: Any, _: Any) -> Any:
        return index < niter

    def body(index: Any, adv: Any) -> tuple[Any, Any]:
        loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(
            labels=one_hot, logits=model_fn(adv)))
        perturbation = step_size * tf.sign(tf.gradients(loss, adv)[0])
        new = tf.clip_by_value(adv + multiplier * perturbation, clip_min, clip_max)
        return index + 1, new

    with tf.control_dependencies([start]):
        _, result = tf.while_loop(cond, body, [0, start], back_prop=False,
                                  parallel_iterations=1)
    return result


def summed_xent_graph(logits: Any, labels: Any) -> Any:
    """Batch sum of softmax cross-entropy against integer ``labels`` (the attack objective)."""
    tf, _, _ = load_tf_slim()
    one_hot = tf.one_hot(labels, tf.shape(logits)[1])
    return tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=one_hot,
                                                                 logits=logits))
