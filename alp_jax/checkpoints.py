"""The one place that reads and writes checkpoints (Orbax).

Layout: ``<output_dir>/checkpoints/<step>/{state,meta}``. ``state`` is the TrainState
pytree (or, for imported weights, just ``params``/``batch_stats``), ``meta`` a JSON dict
(model name, number of classes, config). Orbax writes each step into a temporary
directory and renames it when complete, so an interrupted save leaves no corrupt
checkpoint. All processes of a multi-host job call save and restore together.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), CHECKPOINT_SUBDIR)


def manager(output_dir: str, *, max_to_keep: int | None = 3, async_save: bool = True,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
    """A CheckpointManager for ``<output_dir>/checkpoints`` (created if missing)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        save_interval_steps=save_interval_steps)
    return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options,
                                 item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
         *, force: bool = False) -> bool:
    """Saves (asynchronously when the manager is async); returns whether it saved."""
    return mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore onto the layout of ``tree``."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, like: Any) -> Any:
    """Restores step ``step`` onto the structure, dtypes and shardings of ``like``.

    The shardings of ``like`` decide the placement, so a checkpoint written on N devices
    restores onto any other device count.
    """
    restored = mngr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(like))))
    return restored["state"]


def _step_dirs(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def resolve(path: str) -> str:
    """A step directory from an output dir, a checkpoints dir (latest step) or a step dir.

    Raises FileNotFoundError naming the path when it holds no checkpoint.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return path
    for directory in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        steps = _step_dirs(directory)
        if steps:
            return os.path.join(directory, str(steps[-1]))
    raise FileNotFoundError(
        f"No checkpoint found at {path!r}: expected an output directory with "
        f"'{CHECKPOINT_SUBDIR}/<step>/state', a checkpoints directory, or a step directory.")


def latest_step(output_dir: str) -> int | None:
    """The newest complete checkpoint step in ``<output_dir>/checkpoints``, or None."""
    steps = _step_dirs(checkpoint_dir(output_dir))
    return steps[-1] if steps else None


def read_meta(step_dir: str) -> dict[str, Any]:
    meta_file = os.path.join(step_dir, "meta", "metadata")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            return json.load(f)
    return {}


class _NoMissingMetadataWarning:
    # A composite checkpoint keeps _CHECKPOINT_METADATA one level up; reading one item
    # directly makes Orbax warn about it on every load.
    def filter(self, record) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


def load_raw(path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(state tree as nested dicts of NumPy arrays, meta, step dir) of a checkpoint."""
    import logging

    step_dir = resolve(path)
    quiet = _NoMissingMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _load_raw(step_dir)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _load_raw(step_dir: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    with ocp.StandardCheckpointer() as ckptr:
        meta_tree = ckptr.metadata(os.path.join(step_dir, "state"))
        tree_meta = getattr(meta_tree, "item_metadata", meta_tree)
        target = jax.tree_util.tree_map(
            lambda m: np.zeros(m.shape, m.dtype), dict(tree_meta),
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        cpu = jax.devices("cpu")[0]
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(cpu)),
            target)
        tree = ckptr.restore(os.path.join(step_dir, "state"), abstract)
    tree = jax.tree_util.tree_map(np.asarray, tree)
    return tree, read_meta(step_dir), step_dir


def load_variables(path: str, *, use_ema: bool = False) -> dict[str, Any]:
    """Model variables from a checkpoint, the moving averages when ``use_ema`` and present."""
    tree, _, step_dir = load_raw(path)
    return variables_from_tree(tree, step_dir, use_ema=use_ema)


def variables_from_tree(tree: dict[str, Any], step_dir: str, *,
                        use_ema: bool = False) -> dict[str, Any]:
    """The model variables of a ``load_raw`` tree (the averages when ``use_ema`` and present)."""
    if use_ema and tree.get("ema_params") is not None:
        return {"params": tree["ema_params"], "batch_stats": tree.get("ema_batch_stats", {})}
    if "params" not in tree:
        raise ValueError(f"Checkpoint {step_dir!r} holds no 'params'.")
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}


def save_variables(output_dir: str, variables: dict[str, Any], meta: dict[str, Any],
                   step: int = 0) -> str:
    """Writes bare model variables as a checkpoint (for imported weights); returns its dir."""
    mngr = manager(output_dir, max_to_keep=None, async_save=False)
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    save(mngr, step, tree, meta, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(checkpoint_dir(output_dir), str(step))
