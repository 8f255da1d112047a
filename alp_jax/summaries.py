"""Summaries: TensorBoard event files (tensorboardX, no TensorFlow needed) and JSONL."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class SummaryWriter:
    """Scalars and images to ``logdir`` as TensorBoard events and ``metrics.jsonl``.

    Only process 0 writes; on other processes every call is a no-op. ``provenance``
    (``alp_jax.provenance.record()``) goes into the first ``metrics.jsonl`` record this
    writer writes, so every run segment (a resumed run appends) says what produced it.
    """

    def __init__(self, logdir: str, *, enabled: bool = True,
                 provenance: dict[str, Any] | None = None):
        self.enabled = enabled
        self.logdir = logdir
        self._provenance = provenance
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
        record: dict[str, Any] = {"step": int(step), **clean}
        if self._provenance is not None:
            record["provenance"], self._provenance = self._provenance, None
        with open(os.path.join(self.logdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def images(self, step: int, tag: str, images: np.ndarray,
               bounds: tuple[float, float] = (-1.0, 1.0)) -> None:
        """A batch of NHWC images in ``bounds`` as one TensorBoard image grid, each image
        enlarged (``image_grid``) so that small inputs are readable."""
        if not self.enabled or self._tb is None:
            return
        x = (np.asarray(images, np.float32) - bounds[0]) / (bounds[1] - bounds[0])
        self._tb.add_image(tag, image_grid(np.clip(x, 0, 1)), step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def image_grid(images: np.ndarray, *, min_size: int = 96, columns: int = 8,
               gap: int = 2) -> np.ndarray:
    """NHWC images in [0, 1] as one HWC grid: ``columns`` per row, each image enlarged by
    an integer factor (nearest neighbour, so pixels stay visible) to at least ``min_size``
    pixels, with a ``gap``-pixel white border. TensorBoard shows summary images at their
    stored size: four 16x16 digits side by side were a 64x16 strip."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"image_grid needs a non-empty NHWC batch, got shape {x.shape}.")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, c = x.shape
    factor = max(1, -(-min_size // max(h, w)))
    x = x.repeat(factor, axis=1).repeat(factor, axis=2)
    h, w = h * factor, w * factor
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h,
             gap + q * (w + gap):gap + q * (w + gap) + w] = x[i]
    return grid
