"""Summaries: TensorBoard event files (tensorboardX, no TensorFlow needed) and JSONL."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class SummaryWriter:
    """Scalars and images to ``logdir`` as TensorBoard events and ``metrics.jsonl``.

    Only process 0 writes; on other processes every call is a no-op.
    """

    def __init__(self, logdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.logdir = logdir
        self._tb = None
        if enabled:
            os.makedirs(logdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter as _TB

                self._tb = _TB(logdir=logdir)
            except ImportError:  # JSONL still works
                self._tb = None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        with open(os.path.join(self.logdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")

    def images(self, step: int, tag: str, images: np.ndarray,
               bounds: tuple[float, float] = (-1.0, 1.0)) -> None:
        """A batch of NHWC images in ``bounds`` as one TensorBoard image grid."""
        if not self.enabled or self._tb is None:
            return
        x = (np.asarray(images, np.float32) - bounds[0]) / (bounds[1] - bounds[0])
        self._tb.add_images(tag, np.clip(x, 0, 1), step, dataformats="NHWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
