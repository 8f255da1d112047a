"""The one place that reads and writes checkpoints (Orbax).

Layout: ``<output_dir>/checkpoints/<step>/{state,meta,integrity}``. ``state`` is the
TrainState pytree (or, for imported weights, just ``params``/``batch_stats``), ``meta`` a
JSON dict (model name, number of classes, config), ``integrity`` a checksum per top-level
group of ``state`` (``params``, ``opt_state``, ``ema_params``, ...), computed where the
arrays live at save time and verified after every restore, so flipped bytes are reported as
a damaged checkpoint instead of turning into NaN weights. A checkpoint without checksums
(the ``integrity`` item missing) is refused unless the load allows it
(``allow_unverified``: ``--allow_unverified_checkpoint``, for checkpoints written before
checksums existed), and then each load logs a warning. Orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save leaves no
corrupt checkpoint. All processes of a multi-host job call save and restore together.

Which checkpoint is newest is decided in one place (``steps`` / ``latest_step``), for
training and evaluation alike.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"
ITEMS = ("state", "meta", "integrity")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path."""


class NonFiniteState(CheckpointError):
    """``save`` was given a state holding NaN or infinity (``groups`` names where)."""

    def __init__(self, step: int, groups: list[str]):
        self.step, self.groups = int(step), list(groups)
        super().__init__(f"Not saving step {step}: NaN or infinity in {', '.join(groups)}.")


class CheckpointDamaged(CheckpointError):
    """A checkpoint exists but does not hold what was saved (or holds non-finite values)."""

    def __init__(self, step_dir: str, reason: str):
        self.step_dir, self.reason = step_dir, reason
        super().__init__(f"Checkpoint {step_dir} is damaged: {reason}")


ALLOW_UNVERIFIED_FLAG = "--allow_unverified_checkpoint"


class CheckpointUnverified(CheckpointError):
    """A checkpoint has no recorded checksums, and the load did not allow that.

    Not a CheckpointDamaged: training must refuse it, not move it aside and fall back.
    """

    def __init__(self, step_dir: str):
        self.step_dir = step_dir
        super().__init__(
            f"Checkpoint {step_dir} has no checksums (its integrity item is missing), so "
            "its values cannot be verified; if it was written before checksums existed, "
            f"pass {ALLOW_UNVERIFIED_FLAG} (config field allow_unverified_checkpoint) to "
            "load it anyway.")


# ---- integrity --------------------------------------------------------------------------

def _groups(tree: Any) -> dict[str, Any]:
    """The top-level groups of a state: dataclass fields or dict keys."""
    if isinstance(tree, dict):
        return dict(tree)
    if hasattr(tree, "__dataclass_fields__"):
        return {name: getattr(tree, name) for name in tree.__dataclass_fields__}
    return {"state": tree}


# The unsigned type of each item size, for the bits of a leaf (device and host paths).
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _fmix32(h: Any) -> Any:
    # MurmurHash3's finaliser: a bijection on uint32 that spreads every input bit. NumPy
    # constants keep NumPy arrays on the host and are folded into jitted code alike.
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _sums(flat: Any, xp: Any) -> tuple[Any, Any]:
    """The two position-salted uint32 sums of the flat uint32 bits ``flat``, with ``xp``
    NumPy (host leaves) or jax.numpy (in the jitted function): one formula for both."""
    idx = xp.arange(flat.size, dtype=xp.uint32)
    h1 = xp.sum(_fmix32(flat ^ _fmix32(idx)), dtype=xp.uint32)
    h2 = xp.sum(_fmix32(flat + idx * np.uint32(0x9E3779B9)) * (np.uint32(2) * idx + np.uint32(1)),
                dtype=xp.uint32)
    return h1, h2


def _leaf_hash(x: jax.Array) -> jax.Array:
    """Two 32-bit sums of position-salted, mixed bit patterns. Each term is a bijection
    of its element's bits, so any single changed element changes both sums; integer sums
    are exact and associative, so the value does not depend on the sharding."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:  # only with jax_enable_x64: hash both halves
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    return jnp.stack(_sums(bits.reshape(-1), jnp))


def _is_finite(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.array(True)
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _leaf_hash(x), _is_finite(x)


def _host_leaf_fingerprint(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """``_leaf_fingerprint`` in NumPy, bit for bit, for a leaf in host memory."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.bool_:
        bits = flat.astype(np.uint32)
    else:
        bits = flat.view(_UINT[flat.dtype.itemsize]).astype(np.uint32)
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as on the devices
        h1, h2 = _sums(bits, np)
    finite = not jnp.issubdtype(flat.dtype, jnp.inexact) or bool(np.all(np.isfinite(flat)))
    return np.array([h1, h2], np.uint32), finite


_HOST_HASH_MAX_SIZE = 1 << 20


def _on_host(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when it is hashed with NumPy, else None (hashed where it
    lives). NumPy arrays, and CPU arrays whole in this process or replicated on every
    process (their local replica: the data-parallel state of a cluster), need no compile.
    On the devices each leaf shape compiles once per kind of input: saving (uncommitted
    arrays), restoring (committed) and loading (NumPy) each compiled their own set, 81
    small compiles (8 s on CPU) in a program that saves and restores the small model.
    64-bit dtypes stay on the device path, which narrows them unless x64 is on, and so do
    leaves over ``_HOST_HASH_MAX_SIZE`` elements, where XLA's fused loop outruns NumPy's
    passes (25M float32: 0.78 s in NumPy, 0.09 s compiled, on 2 CPU cores)."""
    if np.size(x) > _HOST_HASH_MAX_SIZE:
        return None
    if isinstance(x, jax.Array):
        if any(d.platform != "cpu" for d in x.sharding.device_set):
            return None
        if x.is_fully_addressable:
            x = np.asarray(x)
        elif x.is_fully_replicated:
            x = np.asarray(x.addressable_data(0))
        else:
            return None
    elif not isinstance(x, np.ndarray):
        return None
    return x if x.dtype == np.bool_ or x.dtype.itemsize <= 4 else None


def fingerprint(tree: Any) -> dict[str, dict[str, Any]]:
    """``{group: {"checksum": hex, "finite": bool}}`` for each top-level group of ``tree``.

    A leaf is hashed where it lives: in NumPy when it is in host memory or on CPU devices
    (``_on_host``), otherwise (accelerators, or shards spread over processes) by one small
    jitted function, compiled once per leaf shape: a model has far fewer shapes than
    leaves, so this traces in milliseconds where one function over the whole state took
    seconds at every program start. Both give the same bits, and only 9 bytes a leaf come
    back from the devices. A group's checksum is the uint32 sum of its leaves' (wrapping,
    so order and sharding do not matter).
    """
    groups = {name: jax.tree_util.tree_leaves(t) for name, t in _groups(tree).items()}
    fps = jax.device_get({
        name: [_leaf_fingerprint(x) if (h := _on_host(x)) is None else _host_leaf_fingerprint(h)
               for x in leaves]
        for name, leaves in groups.items()})
    out = {}
    for name, leaf_fps in fps.items():
        h = np.zeros(2, np.uint32)
        for leaf_h, _ in leaf_fps:
            h = h + np.asarray(leaf_h, np.uint32)  # uint32 addition wraps
        out[name] = {"checksum": f"{int(h[0]):08x}{int(h[1]):08x}",
                     "finite": all(bool(f) for _, f in leaf_fps)}
    return out


def non_finite_groups(tree: Any) -> list[str]:
    """The top-level groups of ``tree`` holding a NaN or infinity (empty when all finite)."""
    return [name for name, fp in fingerprint(tree).items() if not fp["finite"]]


def verify(tree: Any, recorded: dict[str, Any] | None, step_dir: str) -> None:
    """Raises CheckpointDamaged unless ``tree`` matches the checksums saved with it and
    is finite. ``recorded`` None (a load that ``required_checksums`` allowed without them)
    checks finiteness only."""
    fp = fingerprint(tree)
    bad = [name for name, f in fp.items() if not f["finite"]]
    if recorded is not None:
        uncovered = sorted(set(fp) - set(recorded))
        if uncovered:  # an integrity item cut down by hand covers only part of the state
            raise CheckpointDamaged(step_dir, "no checksum recorded for "
                                    + ", ".join(uncovered))
        for name, rec in recorded.items():
            if name in fp and fp[name]["checksum"] != rec:
                bad.append(name)
        if bad:
            raise CheckpointDamaged(step_dir, "the values of " + ", ".join(sorted(set(bad)))
                                    + " do not match the checksums recorded at save time")
    if bad:
        raise CheckpointDamaged(step_dir, "NaN or infinity in " + ", ".join(bad))


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), CHECKPOINT_SUBDIR)


def manager(output_dir: str, *, max_to_keep: int | None = 3, async_save: bool = True,
            save_interval_steps: int = 1) -> ocp.CheckpointManager:
    """A CheckpointManager for ``<output_dir>/checkpoints`` (created if missing).

    ``max_to_keep`` 0 or None keeps every checkpoint, as ``tf.train.Saver``'s
    ``max_to_keep`` 0 did in the original.
    """
    if max_to_keep is not None and max_to_keep < 0:
        raise ValueError(f"max_to_keep must be >= 0 (0 keeps all), got {max_to_keep}.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, create=True, enable_async_checkpointing=async_save,
        save_interval_steps=save_interval_steps)
    try:
        return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options,
                                     item_names=ITEMS)
    except OSError as e:
        raise CheckpointError(_os_error_text(e, checkpoint_dir(output_dir))) from None


def _os_error_text(e: BaseException, path: str) -> str:
    """One line for a failed write: the path, the cause, and the free space when full."""
    while not isinstance(e, OSError) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        free = _free_bytes(path)
        room = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return f"No space left on the device holding {path}{room}."
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"Cannot write to {path}: {e.strerror}."
    return f"Could not write {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _free_bytes(path: str) -> int | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free
    except OSError:
        return None


def _check_room(directory: str, state: Any) -> None:
    # Refuse before Orbax starts: a write that fails half-way in its background threads
    # is reported by them in hundreds of lines. (A race with other writers still ends in
    # the one-line error of ``wait``.)
    needed = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                 for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype"))
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return
    if usage.total > 0 and usage.free < needed:
        raise CheckpointError(
            f"No space left on the device holding {directory}: a checkpoint needs about "
            f"{needed / 2**20:.1f} MiB, {usage.free / 2**20:.1f} MiB are free.")


def _is_write_failure(e: BaseException) -> bool:
    text = str(e)
    while e is not None:
        if isinstance(e, OSError) or "No space left" in text or "Permission denied" in text:
            return True
        e = e.__cause__ or e.__context__
        text = str(e) if e is not None else ""
    return False


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
         *, force: bool = False) -> bool:
    """Saves (asynchronously when the manager is async); returns whether it saved.

    Refuses (CheckpointError) a state holding NaN or infinity, so that every checkpoint
    on disk is one training can continue from. Records the state's checksums.
    """
    fp = fingerprint(state)
    bad = [name for name, f in fp.items() if not f["finite"]]
    if bad:
        raise NonFiniteState(step, bad)
    integrity = {name: f["checksum"] for name, f in fp.items()}
    _check_room(str(mngr.directory), state)
    try:
        return mngr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            integrity=ocp.args.JsonSave(integrity)), force=force)
    except Exception as e:
        if _is_write_failure(e):
            raise CheckpointError(_os_error_text(e, str(mngr.directory))) from None
        raise


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for pending asynchronous saves; a failed write becomes one clear line."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        if _is_write_failure(e):
            raise CheckpointError(_os_error_text(e, str(mngr.directory))) from None
        raise


class Checkpointer:
    """The checkpoints of one training run: asynchronous saves to ``<output_dir>/checkpoints``
    that refuse a state with NaN or infinity, and ``last_good()``, the sentence naming
    the newest checkpoint that really was written (for the run's error messages).

    ``last_saved``: the step already on disk when the run resumed from it (None for a
    fresh run). As a context manager it waits for pending writes and closes on a normal
    exit; after an error it leaves the writes alone (the program reports and exits).
    """

    def __init__(self, output_dir: str, *, keep: int, meta: Callable[[int], dict[str, Any]],
                 last_saved: int | None = None):
        self.output_dir, self.meta, self.last_saved = output_dir, meta, last_saved
        self.mngr = manager(output_dir, max_to_keep=keep, async_save=True)

    def save(self, step: int, state: Any) -> None:
        """Saves ``state`` as ``step`` unless that step is already saved; FloatingPointError
        (naming the last good checkpoint) for a state with NaN or infinity."""
        if self.last_saved == step:
            return
        try:  # save fingerprints the state once: checksums and the finiteness check
            save(self.mngr, step, state, self.meta(step), force=True)
        except NonFiniteState as e:
            raise FloatingPointError(
                f"NaN or infinity in {', '.join(e.groups)} after step {step} although the "
                f"loss was finite; not saving it. {self.last_good()}") from None
        self.last_saved = step

    def last_good(self) -> str:
        """Where the newest checkpoint on disk is (after waiting for pending writes)."""
        wait(self.mngr)
        where = checkpoint_dir(self.output_dir)
        if self.last_saved is None:
            return f"No checkpoint was saved in {where}."
        return f"The last good checkpoint is step {self.last_saved} in {where}."

    def close(self) -> None:
        wait(self.mngr)
        self.mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        if exc_type is None:
            self.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) to restore onto the layout of ``tree``."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def restore_state(mngr: ocp.CheckpointManager, step: int, like: Any, *,
                  allow_unverified: bool = False) -> Any:
    """Restores step ``step`` onto the structure, dtypes and shardings of ``like``.

    The shardings of ``like`` decide the placement, so a checkpoint written on N devices
    restores onto any other device count. Raises CheckpointDamaged when the files cannot
    be read or the values do not match their recorded checksums, CheckpointUnverified
    when there are no checksums (unless ``allow_unverified``).
    """
    step_dir = os.path.join(str(mngr.directory), str(int(step)))
    integrity = required_checksums(step_dir, allow_unverified)  # before the state is read
    try:
        restored = mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(like))))
    except Exception as e:  # noqa: BLE001 (any unreadable file is damage, reported by step)
        raise CheckpointDamaged(step_dir, _first_line(e)) from e
    verify(restored["state"], integrity, step_dir)
    return restored["state"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _step_dirs(directory: str) -> list[int]:
    # Orbax renames a step's temporary directory to "<step>" only once it is complete,
    # so a digit-named directory with a state item is a finished save.
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def steps(output_dir: str) -> list[int]:
    """The complete checkpoint steps in ``<output_dir>/checkpoints``, oldest first."""
    return _step_dirs(checkpoint_dir(output_dir))


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(output_dir), str(int(step)))


def quarantine(output_dir: str, step: int) -> str:
    """Moves a damaged step out of the checkpoints directory (never deletes it), so that
    neither Orbax's bookkeeping nor a later save of the same step trips over it. Only
    process 0 moves; returns the new path."""
    src = step_dir(output_dir, step)
    dest_root = os.path.join(os.path.abspath(output_dir), DAMAGED_SUBDIR)
    dest = os.path.join(dest_root, f"{int(step)}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and os.path.isdir(src):
        os.makedirs(dest_root, exist_ok=True)
        os.replace(src, dest)
    return dest


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
    """The newest complete checkpoint step in ``<output_dir>/checkpoints``, or None.

    Training resumes from, and evaluation evaluates, this step (training falls back to
    an older one only after reporting this one as damaged and moving it aside).
    """
    found = steps(output_dir)
    return found[-1] if found else None


def _read_json_item(step_dir: str, item: str) -> dict[str, Any] | None:
    path = os.path.join(step_dir, item, "metadata")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(step_dir, f"{item}/metadata is unreadable ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointDamaged(step_dir, f"{item}/metadata is not a JSON object")
    return value


def read_meta(step_dir: str) -> dict[str, Any]:
    """The checkpoint's meta dict; CheckpointDamaged if it is missing or unreadable (every
    checkpoint this code writes has one: without it the model would be guessed)."""
    meta = _read_json_item(step_dir, "meta")
    if meta is None:
        raise CheckpointDamaged(step_dir, "its meta item (meta/metadata: the model and "
                                "config it was trained with) is missing")
    return meta


def vanished(step_dir: str, wait_s: float = 2.0) -> bool:
    """Whether ``step_dir`` is gone, or goes within ``wait_s`` (a rotation deleting it
    removes files first and the directory last), rather than being damaged in place."""
    deadline = time.time() + wait_s
    while os.path.isdir(step_dir):
        if time.time() >= deadline:
            return False
        time.sleep(0.1)
    return True


def read_integrity(step_dir: str) -> dict[str, str] | None:
    """The checksums recorded at save time, or None for checkpoints written without."""
    return _read_json_item(step_dir, "integrity")


def required_checksums(step_dir: str, allow_unverified: bool = False) -> dict[str, str] | None:
    """The checksums every load verifies against. None only with ``allow_unverified``
    (logged as a warning on each load); otherwise a checkpoint without them raises
    CheckpointUnverified."""
    integrity = read_integrity(step_dir)
    if integrity is None:
        if not allow_unverified:
            raise CheckpointUnverified(step_dir)
        logging.warning("Loading %s without checksums (%s): its values are not verified.",
                        step_dir, ALLOW_UNVERIFIED_FLAG)
    return integrity


class _NoMissingMetadataWarning:
    # A composite checkpoint keeps _CHECKPOINT_METADATA one level up; reading one item
    # directly makes Orbax warn about it on every load.
    def filter(self, record) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


def load_raw(path: str, *, allow_unverified: bool = False
             ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(state tree as nested dicts of NumPy arrays, meta, step dir) of a checkpoint.

    Raises CheckpointDamaged (naming the step directory) when the files cannot be read,
    do not match the checksums recorded at save time, or hold NaN or infinity;
    CheckpointUnverified, before reading the state, when it has no checksums (unless
    ``allow_unverified``: then a warning).
    """
    import logging as pylogging

    step_dir = resolve(path)
    integrity = required_checksums(step_dir, allow_unverified)  # before the state is read
    quiet = _NoMissingMetadataWarning()
    pylogging.getLogger("absl").addFilter(quiet)
    try:
        tree, meta, step_dir = _load_raw(step_dir)
    except CheckpointDamaged:
        raise
    except Exception as e:  # noqa: BLE001 (any unreadable file is damage, reported by path)
        raise CheckpointDamaged(step_dir, _first_line(e)) from e
    finally:
        pylogging.getLogger("absl").removeFilter(quiet)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        verify(tree, integrity, step_dir)
    return tree, meta, step_dir


def _load_raw(step_dir: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    with ocp.StandardCheckpointer() as ckptr:
        meta_tree = ckptr.metadata(os.path.join(step_dir, "state"))
        tree_meta = getattr(meta_tree, "item_metadata", meta_tree)
        target = jax.tree_util.tree_map(
            lambda m: np.zeros(m.shape, m.dtype), dict(tree_meta),
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        cpu = jax.local_devices(backend="cpu")[0]  # this process's: any process may load
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(cpu)),
            target)
        tree = ckptr.restore(os.path.join(step_dir, "state"), abstract)
    tree = jax.tree_util.tree_map(np.asarray, tree)
    return tree, read_meta(step_dir), step_dir


def load_variables(path: str, *, use_ema: bool = False,
                   allow_unverified: bool = False) -> dict[str, Any]:
    """Model variables from a checkpoint, the moving averages when ``use_ema`` and present."""
    tree, _, step_dir = load_raw(path, allow_unverified=allow_unverified)
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
