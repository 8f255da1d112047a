"""TF-slim checkpoints <-> our variables: import the released weights, export ours.

A TF-slim checkpoint names each variable like ``resnet_v2_50/block1/unit_1/bottleneck_v2/
conv1/BatchNorm/gamma``; ``alp_jax.slim_names`` gives our variables exactly those names, so
importing is a lookup by name with checks and exporting writes the same names back.

- ``read_tf_checkpoint``: ``{name: ndarray}`` of a TF checkpoint (prefix or directory).
- ``tf_to_variables``: picks the model variables out of that dict (the moving averages
  ``<name>/ExponentialMovingAverage`` on request), infers the model and number of
  classes, ignores the global step and optimizer slots with a note, and raises on any
  variable left unmapped or unfilled or any shape that differs, listing the names.
- ``import_tf_checkpoint``: the above, written as an Orbax checkpoint that
  ``alp_jax.eval`` and fine-tuning load directly.
- ``write_tf_checkpoint`` / ``export_tf_checkpoint``: our variables as a TF (V1 Saver)
  checkpoint with TF-slim names, restorable by TF-slim code.

TensorFlow is imported lazily inside the functions that need it; the rest of the library
does not depend on it.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from alp_jax import checkpoints, slim_names

EMA_SUFFIX = "ExponentialMovingAverage"
# Last name component of TF1 optimizer slots (``<var>/RMSProp``, ``<var>/Adam_1``, ...).
SLOT_RE = re.compile(r"^(RMSProp|Momentum|Adam|Adagrad|AdagradDA|Adadelta|Ftrl|"
                     r"ProximalAdagrad)(_\d+)?$")
GLOBAL_STEP = "global_step"
# Non-model bookkeeping that optimizers and savers keep outside slots.
NON_MODEL = ("beta1_power", "beta2_power", "_CHECKPOINTABLE_OBJECT_GRAPH")

log = logging.getLogger(__name__)


def _import_tf() -> Any:
    try:
        import tensorflow as tf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Reading or writing TF checkpoints needs TensorFlow: "
                          "pip install 'alp-jax[tf]' (or tensorflow-cpu).") from e
    return tf


# ---- reading ----------------------------------------------------------------------------

def resolve_tf_checkpoint(path: str) -> str:
    """The checkpoint prefix for a prefix, a ``.index``/``.data-*`` file or a directory.

    A directory resolves through its ``checkpoint`` state file, else to its only
    ``*.index`` prefix (looked for in subdirectories when it has none itself; the highest
    ``-STEP`` when several share a name). A file that is none of these is taken as a
    single-file (V1) checkpoint. Raises FileNotFoundError naming the path when no
    checkpoint is there.
    """
    if not path:
        raise FileNotFoundError("No TF checkpoint given (empty path).")
    path = os.path.abspath(os.path.expanduser(path))
    m = re.match(r"^(.*)\.(index|data-\d{5}-of-\d{5}|meta)$", path)
    if m and os.path.isfile(path):
        path = m.group(1)
    if os.path.isdir(path):
        tf = _import_tf()
        latest = tf.train.latest_checkpoint(path)
        if latest and os.path.exists(latest + ".index"):
            return latest
        found = glob.glob(os.path.join(path, "*.index"))
        if not found:  # e.g. a release tarball unpacked with its own folder inside
            found = glob.glob(os.path.join(path, "**", "*.index"), recursive=True)
        prefixes = sorted(p[: -len(".index")] for p in found)
        if len(prefixes) == 1:
            return prefixes[0]
        if prefixes:
            stepped = [p for p in prefixes if re.search(r"-\d+$", p)]
            if len(stepped) == len(prefixes) and len({p.rsplit("-", 1)[0] for p in stepped}) == 1:
                return max(stepped, key=lambda p: int(p.rsplit("-", 1)[1]))
            raise FileNotFoundError(
                f"TF checkpoint directory {path!r} holds several checkpoints "
                f"({', '.join(os.path.relpath(p, path) for p in prefixes)}); pass one prefix.")
        raise FileNotFoundError(f"No TF checkpoint in directory {path!r} (no *.index file).")
    if os.path.exists(path + ".index"):
        return path
    if os.path.isfile(path) and not path.endswith((".index", ".meta")):
        return path  # a single-file (V1 format) checkpoint
    raise FileNotFoundError(
        f"No TF checkpoint at {path!r}: expected a prefix with a '.index' file beside it "
        "(e.g. /dir/model.ckpt-123 for model.ckpt-123.index) or a directory.")


def read_tf_checkpoint(path: str) -> dict[str, np.ndarray]:
    """``{variable name: ndarray}`` of every tensor in a TF checkpoint (prefix or dir)."""
    tf = _import_tf()
    prefix = resolve_tf_checkpoint(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise ValueError(f"Cannot read TF checkpoint {prefix!r}: {e}") from e
    return {name: np.asarray(reader.get_tensor(name))
            for name in sorted(reader.get_variable_to_shape_map())}


# ---- mapping ----------------------------------------------------------------------------

@dataclasses.dataclass
class ImportedVariables:
    """Result of ``tf_to_variables``.

    Attributes:
      variables: ``{'params': ..., 'batch_stats': ...}`` of NumPy arrays.
      model_name: the model (and TF scope), e.g. ``resnet_v2_50``.
      num_classes: number of logits.
      notes: what was ignored or substituted, one line each.
      global_step: the checkpoint's ``global_step`` when it has one.
      moving_averages: how many variables took their ``/ExponentialMovingAverage`` value.
    """

    variables: dict[str, Any] = dataclasses.field(repr=False)
    model_name: str
    num_classes: int
    notes: list[str]
    global_step: int | None = None
    moving_averages: int = 0


def _classify(named: Mapping[str, np.ndarray]) -> tuple[dict[str, list[str]], list[str]]:
    """Splits TF names into ignorable groups and model-variable candidates."""
    groups: dict[str, list[str]] = {"global_step": [], "slots": [], "ema": [], "other": []}
    candidates = []
    for name in named:
        last = name.rsplit("/", 1)[-1]
        if name == GLOBAL_STEP:
            groups["global_step"].append(name)
        elif last == EMA_SUFFIX and "/" in name:
            groups["ema"].append(name)
        elif SLOT_RE.match(last) and "/" in name:
            groups["slots"].append(name)
        elif name in NON_MODEL:
            groups["other"].append(name)
        else:
            candidates.append(name)
    return groups, candidates


def _infer_model(candidates: list[str], where: str) -> str:
    from alp_jax.model import MODELS

    scopes = sorted({n.split("/", 1)[0] for n in candidates})
    if not scopes:
        raise ValueError(f"TF checkpoint {where} holds no model variables.")
    if len(scopes) > 1:
        raise ValueError(
            f"TF checkpoint {where} holds variables under several top-level scopes "
            f"({', '.join(scopes)}); expected one model scope such as 'resnet_v2_50'.")
    if scopes[0] not in MODELS:
        raise ValueError(
            f"TF checkpoint {where} has model scope {scopes[0]!r}, which names no model "
            f"here; known models: {', '.join(MODELS)}.")
    return scopes[0]


def _infer_num_classes(named: Mapping[str, np.ndarray], scope: str, where: str) -> int:
    for leaf, axis in (("biases", 0), ("weights", -1)):
        value = named.get(f"{scope}/logits/{leaf}")
        if value is not None and np.ndim(value) > 0:
            return int(np.shape(value)[axis])
    raise ValueError(f"Cannot infer num_classes: TF checkpoint {where} has no "
                     f"'{scope}/logits/biases' or '{scope}/logits/weights'; pass num_classes.")


def model_shapes(model_name: str, num_classes: int) -> dict[str, Any]:
    """Zero-cost stand-ins (broadcast zeros) shaped like the model's variables."""
    import jax
    import jax.numpy as jnp

    from alp_jax.model import create_model

    model = create_model(model_name, num_classes)
    abstract = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 64, 64, 3), jnp.float32), train=False),
        jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(
        lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), dict(abstract))


def tf_to_variables(named: Mapping[str, np.ndarray], *, num_classes: int | None = None,
                    use_moving_averages: bool = False,
                    source: str = "<dict>") -> ImportedVariables:
    """Our model variables from ``{TF name: ndarray}``, with every name accounted for.

    The model comes from the top-level scope of the names, ``num_classes`` (when None)
    from the logits. With ``use_moving_averages`` each variable takes
    ``<name>/ExponentialMovingAverage`` when present (an error when the checkpoint has
    none). The global step, optimizer slots and unused moving averages are ignored
    with a note. A TF variable left unmapped, a model variable left unfilled or a shape
    that differs raises ValueError listing the names.
    """
    groups, candidates = _classify(named)
    model_name = _infer_model(candidates, source)
    inferred = _infer_num_classes(named, model_name, source)
    if num_classes is None:
        num_classes = inferred
    elif num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    elif num_classes != inferred:
        raise ValueError(
            f"num_classes={num_classes} but TF checkpoint {source} has {inferred} logits "
            f"('{model_name}/logits'); omit num_classes to use {inferred}.")
    like = model_shapes(model_name, num_classes)
    wanted = slim_names.variables_to_slim(like)
    ema_names = set(groups["ema"])
    if use_moving_averages and not ema_names:
        raise ValueError(
            f"use_moving_averages was asked for, but TF checkpoint {source} has no "
            f"'.../{EMA_SUFFIX}' variables (the released checkpoints were re-saved without "
            "them); import without it.")

    unmapped = sorted(set(candidates) - set(wanted))
    missing, mismatched, chosen = [], [], {}
    used_ema = 0
    for name, ref in sorted(wanted.items()):
        ema = f"{name}/{EMA_SUFFIX}"
        src = ema if use_moving_averages and ema in ema_names else name
        if src not in named:
            missing.append(name)
            continue
        value = np.asarray(named[src])
        if value.shape != ref.shape:
            mismatched.append(f"{src}: checkpoint {value.shape} vs model {ref.shape}")
            continue
        used_ema += src == ema
        chosen[name] = value
    if unmapped or missing or mismatched:
        parts = [f"TF checkpoint {source} does not match {model_name} with {num_classes} "
                 "classes:"]
        if unmapped:
            parts.append(f"{len(unmapped)} TF variables map onto no model variable:\n  "
                         + "\n  ".join(unmapped))
        if missing:
            parts.append(f"{len(missing)} model variables are missing from the checkpoint:"
                         "\n  " + "\n  ".join(missing))
        if mismatched:
            parts.append(f"{len(mismatched)} shapes differ:\n  " + "\n  ".join(mismatched))
        raise ValueError("\n".join(parts))

    notes = []
    global_step = None
    if groups["global_step"]:
        global_step = int(np.asarray(named[GLOBAL_STEP]).reshape(-1)[0])
        notes.append(f"ignored the global step ({GLOBAL_STEP} = {global_step})")
    if groups["slots"]:
        kinds = Counter(n.rsplit("/", 1)[-1] for n in groups["slots"])
        notes.append(f"ignored {len(groups['slots'])} optimizer slots ("
                     + ", ".join(f"{k}: {c}" for k, c in sorted(kinds.items())) + ")")
    if groups["other"]:
        notes.append("ignored optimizer/saver bookkeeping: " + ", ".join(groups["other"]))
    unused_ema = len(ema_names) - used_ema
    if use_moving_averages:
        notes.append(f"took the moving averages of {used_ema} of {len(wanted)} variables "
                     f"(the other {len(wanted) - used_ema} have none and keep their values)")
    if unused_ema:
        notes.append(f"ignored {unused_ema} moving averages ('.../{EMA_SUFFIX}')"
                     + ("" if use_moving_averages else "; use_moving_averages takes them"))
    variables = slim_names.variables_from_slim(chosen, like)
    return ImportedVariables(variables, model_name, num_classes, notes, global_step, used_ema)


def import_tf_checkpoint(checkpoint: str, output_dir: str, *, num_classes: int | None = None,
                         use_moving_averages: bool = False,
                         dataset_image_size: int | None = None) -> tuple[str, ImportedVariables]:
    """Converts a TF-slim checkpoint into an Orbax checkpoint under ``output_dir``.

    Returns the written step directory and the import result. The meta records
    ``model_name``, ``num_classes``, ``source='tf'``, ``tf_checkpoint`` (the prefix) and,
    when given, ``dataset_image_size``. Refuses to overwrite an existing checkpoint.
    """
    prefix = resolve_tf_checkpoint(checkpoint)
    if checkpoints.latest_step(output_dir) is not None:
        raise FileExistsError(
            f"--output_dir {output_dir!r} already holds a checkpoint "
            f"({checkpoints.checkpoint_dir(output_dir)}); choose an empty directory.")
    if dataset_image_size is not None and dataset_image_size <= 0:
        raise ValueError(f"dataset_image_size must be positive, got {dataset_image_size}.")
    result = tf_to_variables(read_tf_checkpoint(prefix), num_classes=num_classes,
                             use_moving_averages=use_moving_averages, source=repr(prefix))
    for note in result.notes:
        log.info("%s: %s", prefix, note)
    meta: dict[str, Any] = {"model_name": result.model_name,
                            "num_classes": result.num_classes,
                            "source": "tf", "tf_checkpoint": prefix,
                            "tf_moving_averages": bool(use_moving_averages)}
    if dataset_image_size is not None:
        meta["dataset_image_size"] = int(dataset_image_size)
    if result.global_step is not None:
        meta["tf_global_step"] = result.global_step
    step_dir = checkpoints.save_variables(output_dir, result.variables, meta)
    return step_dir, result


# ---- writing ----------------------------------------------------------------------------

def variables_to_tf(variables: Mapping[str, Any],
                    ema_variables: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``{TF-slim name: ndarray}``, moving averages (if given) as ``<name>/<EMA_SUFFIX>``."""
    named = slim_names.variables_to_slim(variables)
    if ema_variables:
        for name, value in slim_names.variables_to_slim(ema_variables).items():
            if name not in named:
                raise ValueError(f"Moving average {name!r} has no model variable.")
            named[f"{name}/{EMA_SUFFIX}"] = value
    return named


def write_tf_checkpoint(named: Mapping[str, Any], prefix: str, *,
                        global_step: int | None = None) -> str:
    """Writes ``{name: array}`` as a TF (V2 format, V1 Saver) checkpoint at ``prefix``.

    The names are the checkpoint keys exactly, so TF-slim code restores them with a
    plain ``tf.compat.v1.train.Saver``. ``global_step`` (when given) is written as an
    int64 ``global_step``. Also writes the ``checkpoint`` state file, so the directory
    works as ``tf.train.latest_checkpoint``. Returns the prefix.
    """
    tf = _import_tf()
    prefix = os.path.abspath(os.path.expanduser(prefix))
    if os.path.isdir(prefix):
        raise ValueError(f"TF checkpoint prefix {prefix!r} is a directory; pass e.g. "
                         f"{os.path.join(prefix, 'model.ckpt')!r}.")
    if GLOBAL_STEP in named and global_step is not None:
        raise ValueError(f"{GLOBAL_STEP!r} given both as a variable and as global_step.")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        var_list, feeds = {}, {}
        items = [(n, np.asarray(v)) for n, v in named.items()]
        if global_step is not None:
            items.append((GLOBAL_STEP, np.asarray(global_step, np.int64)))
        for i, (name, value) in enumerate(items):
            ph = tf.compat.v1.placeholder(tf.as_dtype(value.dtype), value.shape)
            var = tf.compat.v1.Variable(ph, name=f"var_{i}", trainable=False)
            var_list[name] = var
            feeds[ph] = value
        saver = tf.compat.v1.train.Saver(var_list=var_list)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run([v.initializer for v in var_list.values()], feed_dict=feeds)
            saver.save(sess, prefix, write_meta_graph=False)
    return prefix


def export_tf_checkpoint(checkpoint_path: str, prefix: str, *, moving_averages: bool = True,
                         global_step: int | None = None,
                         allow_unverified: bool = False) -> str:
    """Writes one of our checkpoints as a TF-slim checkpoint at ``prefix``.

    The raw values get the slim names; when the checkpoint has moving averages and
    ``moving_averages`` is set, they are written too, as ``<name>/ExponentialMovingAverage``
    (the layout of TF's ExponentialMovingAverage). ``global_step`` defaults to the
    checkpoint's step. A checkpoint without checksums is refused (CheckpointUnverified)
    unless ``allow_unverified``. Returns the prefix.
    """
    tree, meta, step_dir = checkpoints.load_raw(checkpoint_path,
                                                allow_unverified=allow_unverified)
    variables = checkpoints.variables_from_tree(tree, step_dir)  # read (and verified) once
    ema = None
    if moving_averages and tree.get("ema_params") is not None:
        ema = checkpoints.variables_from_tree(tree, step_dir, use_ema=True)
    if global_step is None:
        step = tree.get("step", meta.get("step"))
        if step is None and os.path.basename(step_dir).isdigit():
            step = os.path.basename(step_dir)
        global_step = int(np.asarray(step)) if step is not None else 0
    named = variables_to_tf(variables, ema)
    log.info("Exporting %s (%d TF variables%s) to %s", step_dir, len(named),
             ", moving averages included" if ema else "", prefix)
    return write_tf_checkpoint(named, prefix, global_step=global_step)
