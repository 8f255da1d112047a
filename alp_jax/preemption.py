"""SIGTERM as a save-and-exit at a step every process agrees on."""

from __future__ import annotations

import signal

import jax


class Preemption:
    """Turns SIGTERM into a save-and-exit at a step every process agrees on.

    One process: a SIGTERM handler sets a flag the loop polls. Several processes: JAX's
    coordination service owns SIGTERM (its preemption notifier), and
    ``multihost_utils.reached_preemption_sync_point`` returns True on every process at
    the same step, so all of them reach the collective save together. The handler stays
    installed until ``__exit__``, i.e. through the final save.
    """

    def __init__(self) -> None:
        self._flag = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self) -> Preemption:
        if self._multi:
            return self  # the coordination service's notifier handles SIGTERM
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        """Whether to save and exit after ``step`` (call once per step, on every process)."""
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(int(step))
        return self._flag

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
