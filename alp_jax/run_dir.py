"""A training run's output directory: one writer at a time, and resume only into the same run.

``OutputDirLock`` makes a second run into the same ``--output_dir`` fail at once instead
of silently mixing two runs' checkpoints. The lock is a small JSON file whose mtime the
holder refreshes (a lease); a lock whose holder is dead (same host, process gone) or
whose lease has run out (another host stopped refreshing it) is taken over, with a
warning, so a crashed run never leaves the directory stuck.

``check_resume`` compares the config recorded with a checkpoint to the one a run was
started with: anything but the fields in ``MAY_CHANGE`` (how long to train, how often
to log and save, where the data lives) differing is refused, naming every difference,
unless ``allow_resume_changes`` is set.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging

LOCK_NAME = "RUN.lock"

# Fields a resumed run may change without becoming another run.
MAY_CHANGE = frozenset({
    "max_steps", "log_every_steps", "save_model_steps", "save_summaries_steps",
    "keep_checkpoints", "num_summary_images", "output_dir", "imagenet_data_dir",
    "tiny_imagenet_data_dir", "max_loss", "allow_resume_changes",
    "allow_unverified_checkpoint",
    # Evaluation settings: they do not touch training.
    "eval_name", "adv_method", "split_name", "num_examples", "eval_interval_secs",
    "eval_batch_size",
})


class OutputDirInUse(RuntimeError):
    """Another live run holds the output directory."""


class OutputDirNotWritable(PermissionError):
    """The output directory cannot be created or written (read-only, no permission)."""


class ResumeMismatch(ValueError):
    """The output directory holds a different run than the one asked for."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputDirLock:
    """Exclusive, lease-based lock on a directory (``<directory>/RUN.lock``).

    ``lease_s``: a lock not refreshed for this long is stale (its holder is gone or
    hung); the holder refreshes it every ``lease_s / 4`` from a daemon thread.
    """

    def __init__(self, directory: str, *, lease_s: float = 120.0):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.lease_s = float(lease_s)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _read(self) -> tuple[dict[str, Any] | None, float]:
        try:
            age = time.time() - os.path.getmtime(self.path)
            with open(self.path) as f:
                return json.load(f), age
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):  # half-written by a holder killed mid-write
            return {}, time.time() - os.path.getmtime(self.path)

    def _stale_reason(self, info: dict[str, Any], age: float) -> str | None:
        if age > self.lease_s:
            return f"not refreshed for {age:.0f}s (lease {self.lease_s:.0f}s)"
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                and not _pid_alive(info["pid"]):
            return f"process {info['pid']} on this host is gone"
        return None

    def acquire(self) -> OutputDirLock:
        check_writable(self.directory)  # a read-only directory: one line, not a traceback
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, age = self._read()
                if info is None:
                    continue  # released meanwhile: try again
                reason = self._stale_reason(info, age)
                if reason is None:
                    raise OutputDirInUse(
                        f"--output_dir {self.directory} is in use by another run (process "
                        f"{info.get('pid', '?')} on {info.get('host', '?')}, started "
                        f"{info.get('started', '?')}; lock {self.path} refreshed {age:.0f}s "
                        "ago). Use another --output_dir, or wait for that run to end.") from None
                logging.warning("Taking over the stale lock %s (%s).", self.path, reason)
                tmp = f"{self.path}.{self.token}"
                with open(tmp, "w") as f:
                    json.dump(self._info(), f)
                os.replace(tmp, self.path)
                time.sleep(0.2)  # let a competing taker's replace land, then check who won
                info, _ = self._read()
                if not info or info.get("token") != self.token:
                    raise OutputDirInUse(
                        f"--output_dir {self.directory}: another run took over the stale "
                        f"lock {self.path} at the same time.") from None
                break
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
            break
        else:
            raise OutputDirInUse(f"Could not lock {self.path}.")
        self._thread = threading.Thread(target=self._refresh, name="output-dir-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        info, _ = self._read()
        if info and info.get("token") == self.token:
            try:
                os.remove(self.path)
            except OSError:
                pass

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_writable(output_dir: str) -> None:
    """Creates ``output_dir`` and proves it writable with a real write (``os.access`` says
    yes to root on a read-only mount), before hours of work go into it;
    OutputDirNotWritable naming the directory and the cause otherwise."""
    probe = os.path.join(output_dir, f".write_test.{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OutputDirNotWritable(
            f"--output_dir={output_dir!r} is not writable ({e.strerror}); give a directory "
            "this process can write.") from None


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))


def config_differences(recorded: dict[str, Any], current: dict[str, Any],
                       may_change: frozenset[str] = MAY_CHANGE) -> list[tuple[str, Any, Any]]:
    """``(field, recorded, current)`` for every field that differs and may not change.

    Fields absent from either side (configs written by older versions) are not compared.
    """
    recorded, current = _normalise(recorded), _normalise(current)
    return [(k, recorded[k], current[k]) for k in sorted(recorded.keys() & current.keys())
            if k not in may_change and recorded[k] != current[k]]


def check_resume(recorded: dict[str, Any] | None, current: dict[str, Any], *, where: str,
                 allow_changes: bool = False) -> list[tuple[str, Any, Any]]:
    """Raises ResumeMismatch naming each differing field, unless ``allow_changes``
    (then the differences are logged as a warning and returned)."""
    if recorded is None:
        logging.warning("%s records no config; resuming without checking that it is the "
                        "same run.", where)
        return []
    diffs = config_differences(recorded, current)
    if not diffs:
        return []
    listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs)
    if not allow_changes:
        raise ResumeMismatch(
            f"{where} holds a run with a different config ({listed}). Use another "
            "--output_dir for a new run, or pass --config.allow_resume_changes=true to "
            "continue this one with the new values.")
    logging.warning("Resuming %s with changed settings (allow_resume_changes): %s.", where,
                    listed)
    return diffs
