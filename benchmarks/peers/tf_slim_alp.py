"""The original ALP step in TF-slim graph mode (TF1-style, oneDNN on x86 CPUs).

The release's graph: TF-slim ``resnet_v2_50`` (inference mode for the attack, training
mode for the mixed minibatch, variables shared), its PGD as a ``tf.while_loop`` over the
batch-summed cross-entropy with a random start, the interleaved mixed minibatch,
``softmax_cross_entropy`` with label smoothing 0.1 + ``lp_weight * mean((clean - adv)^2)``
+ weight decay ``1e-4 * sum(l2_loss)`` over all trainable variables,
``tf.train.RMSPropOptimizer(0.045, 0.9, momentum=0.9, epsilon=1.0)`` after the BatchNorm
update ops, and an ExponentialMovingAverage(0.9999) of the trainable variables.

Needs tensorflow-cpu and tf-slim (the ``tf`` extra)::

    python benchmarks/peers/tf_slim_alp.py --batch 32 --attack pgdll_16_2_10 --steps 10
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import numpy as np  # noqa: E402


def load_tf_slim() -> tuple[Any, Any, Any]:
    """``(tf, slim, resnet_v2)``; aliases ``tf_keras.legacy_tf_layers`` for slim's batch
    norm (tf-keras >= 2.16 ships it only as ``tf_keras.src.legacy_tf_layers``)."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras

    try:
        importlib.import_module("tf_keras.legacy_tf_layers.normalization")
    except ImportError:
        legacy = importlib.import_module("tf_keras.src.legacy_tf_layers")
        sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy)
        tf_keras.legacy_tf_layers = legacy
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


def build(args: Any, part: str, batch: int, attack: str) -> tuple[Any, Any, Any, Any]:
    """(graph, fetch, images placeholder, labels placeholder) of one part."""
    tf, slim, resnet_v2 = load_tf_slim()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [batch, args.image_size, args.image_size, 3])
        labels = v1.placeholder(tf.int32, [batch])

        blocks = [resnet_v2.resnet_v2_block(f"block{i + 1}", base_depth=d, num_units=n,
                                            stride=s)
                  for i, (d, n, s) in enumerate(zip((64, 128, 256, 512), common.units(args),
                                                    (2, 2, 2, 1), strict=True))]

        def model(x: Any, is_training: bool) -> Any:  # resnet_v2.resnet_v2_50 at 3,4,6,3
            with slim.arg_scope(resnet_v2.resnet_arg_scope(weight_decay=0.0)):
                logits, _ = resnet_v2.resnet_v2(
                    x, blocks, args.num_classes, is_training=is_training, global_pool=True,
                    include_root_block=True, reuse=v1.AUTO_REUSE,
                    scope="resnet_v2_50")
            return tf.reshape(logits, [-1, args.num_classes])

        adv = None
        if part != "clean":
            adv = pgd(tf, images, lambda x: model(x, False), attack)
        if part == "attack":
            return graph, (adv, v1.global_variables_initializer()), images, labels
        if adv is None:
            inputs, both = images, labels
        else:
            inputs = tf.reshape(tf.stack([images, adv], axis=1),
                                [2 * batch, args.image_size, args.image_size, 3])
            both = tf.reshape(tf.stack([labels, labels], axis=1), [2 * batch])
        logits = model(inputs, True)
        loss = v1.losses.softmax_cross_entropy(tf.one_hot(both, args.num_classes), logits,
                                               label_smoothing=common.LABEL_SMOOTHING)
        if adv is not None and args.lp_weight > 0:
            loss += args.lp_weight * v1.losses.mean_squared_error(logits[0::2], logits[1::2])
        tvars = v1.trainable_variables()
        loss += common.WEIGHT_DECAY * tf.add_n([tf.nn.l2_loss(v) for v in tvars])
        step = v1.train.get_or_create_global_step()
        opt = v1.train.RMSPropOptimizer(common.LEARNING_RATE, common.RMSPROP_DECAY,
                                        momentum=common.MOMENTUM,
                                        epsilon=common.RMSPROP_EPSILON)
        with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
            train = opt.minimize(loss, global_step=step)
        ema = v1.train.ExponentialMovingAverage(common.MOVING_AVERAGE_DECAY, step)
        with tf.control_dependencies([train]):
            train = ema.apply(tvars)
        init = v1.global_variables_initializer()
    return graph, (train, init), images, labels


def pgd(tf: Any, x: Any, model_fn: Any, spec: str) -> Any:
    """The release's PGD with its random start (``adversarial_attack.generate_pgd*``)."""
    method, eps, step, niter = common.parse_attack(spec)
    epsilon, step_size = eps * 2.0 / 255.0, step * 2.0 / 255.0
    logits = model_fn(x)
    num_classes = tf.shape(logits)[1]
    if method == "pgdrnd":
        target = tf.random.uniform([tf.shape(x)[0]], 0, num_classes, tf.int32)
    else:
        target = tf.argmax(logits, 1) if method == "pgd" else tf.argmin(logits, 1)
    one_hot = tf.stop_gradient(tf.one_hot(target, num_classes))
    multiplier = 1.0 if method == "pgd" else -1.0
    clip_min = tf.maximum(x - epsilon, -1.0)
    clip_max = tf.minimum(x + epsilon, 1.0)
    start = tf.clip_by_value(x + tf.random.uniform(tf.shape(x), -epsilon, epsilon),
                             clip_min, clip_max)

    def body(index: Any, adv: Any) -> tuple[Any, Any]:
        loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(
            labels=one_hot, logits=model_fn(adv)))
        new = adv + multiplier * step_size * tf.sign(tf.gradients(loss, adv)[0])
        return index + 1, tf.clip_by_value(new, clip_min, clip_max)

    _, result = tf.while_loop(lambda i, _: i < niter, body, [0, start], back_prop=False,
                              parallel_iterations=1)
    return tf.stop_gradient(result)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    common.units(args)
    tf, _, _ = load_tf_slim()
    v1 = tf.compat.v1
    threads = args.threads or 0
    config = v1.ConfigProto(intra_op_parallelism_threads=threads,
                            inter_op_parallelism_threads=threads)
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 Linux)")
    rng = np.random.default_rng(0)
    records = []
    for batch in common.csv(args.batch, int):
        feed_images = rng.uniform(-1, 1, (batch, args.image_size, args.image_size, 3))
        feed_labels = rng.integers(0, args.num_classes, batch)
        attacks = common.csv(args.attack)
        for attack in attacks:
            for part in common.csv(args.parts):
                if part == "clean" and attack != attacks[0]:
                    continue
                graph, (fetch, init), images, labels = build(args, part, batch, attack)
                with v1.Session(graph=graph, config=config) as sess:
                    sess.run(init)
                    feed = {images: feed_images.astype(np.float32),
                            labels: feed_labels.astype(np.int32)}
                    times, first, cpu = common.time_steps(
                        lambda f=fetch, d=feed, s=sess: s.run(f, d), args.warmup, args.steps)
                rec = common.record(args, "tf-slim-graph", part, batch, attack, times, first,
                                    cpu, tf_version=tf.__version__, onednn=onednn)
                records.append(rec)
                common.emit(rec, args.json)
    print(common.table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
