"""scikit-learn's handwritten digits as a tiny real data set for CPU demos and tests.

1,797 8x8 grey images (values 0..16, shipped with scikit-learn, no download), upsampled
bilinearly to ``image_size``, replicated to 3 channels and scaled to [-1, 1] like the
original's ImageNet preprocessing. A fixed 80/20 split gives 1,438 train and 359
validation examples.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from collections.abc import Iterator

import numpy as np

SPLITS = ("train", "validation")
_VALIDATION_FRACTION = 0.2


@functools.lru_cache(maxsize=8)
def load_split(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images float32 [N, S, S, 3] in [-1, 1], labels int32 [N])."""
    if split not in SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; valid splits: {', '.join(SPLITS)}.")
    if image_size < 8:
        raise ValueError(f"digits image_size must be >= 8, got {image_size}.")
    import jax

    images, labels = _raw_digits()
    images = images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = labels.astype(np.int32)
    order = np.random.RandomState(0).permutation(len(labels))
    n_val = int(round(len(labels) * _VALIDATION_FRACTION))
    idx = order[n_val:] if split == "train" else order[:n_val]
    images, labels = images[idx], labels[idx]
    if image_size != 8:
        images = np.asarray(jax.image.resize(
            images, (len(images), image_size, image_size), method="linear"))
    images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
    images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32)
    # Cached and shared by every caller: make accidental in-place edits fail loudly.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits`` returns them (images float [1797, 8, 8] in
    0..16, labels int [1797]), read straight from the file scikit-learn ships.

    Importing ``sklearn.datasets`` pulls in scipy and pandas, over a second at every
    program start, for a 1,797-row CSV; ``load_digits`` itself only parses that file.
    Where the file is not at its usual place, ``load_digits`` reads it.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    roots = spec.submodule_search_locations if spec is not None else None
    path = os.path.join(roots[0], "datasets", "data", "digits.csv.gz") if roots else ""
    if os.path.isfile(path):
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def num_examples(split: str) -> int:
    return len(load_split(split, 8)[1])


def _check_batch(local_batch_size: int, process_count: int, n: int) -> None:
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be positive, got {local_batch_size}.")
    if local_batch_size * process_count > n:
        raise ValueError(
            f"Global batch {local_batch_size * process_count} is larger than the digits "
            f"split ({n} examples).")


def train_iterator(
    image_size: int, local_batch_size: int, *, seed: int = 0, process_index: int = 0,
    process_count: int = 1, start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite batches; epoch e uses permutation RandomState(seed + e) of the train split.

    Step s of the global stream holds examples [s*G, (s+1)*G) of the concatenated epochs
    (G the global batch); process p yields rows [p*local, (p+1)*local) of it, so the
    processes' shares are disjoint and the order is independent of where a run resumed.
    """
    images, labels = load_split("train", image_size)
    n = len(labels)
    _check_batch(local_batch_size, process_count, n)
    global_batch = local_batch_size * process_count
    step = start_step
    perms: dict[int, np.ndarray] = {}

    def perm(epoch: int) -> np.ndarray:
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.RandomState(seed + epoch).permutation(n)
        return perms[epoch]

    while True:
        first = step * global_batch + process_index * local_batch_size
        pos = np.arange(first, first + local_batch_size)
        idx = np.empty(local_batch_size, np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            idx[sel] = perm(int(epoch))[pos[sel] % n]
        yield {"images": images[idx], "labels": labels[idx]}
        step += 1


def eval_iterator(
    image_size: int, local_batch_size: int, *, split: str = "validation",
    num_examples: int = -1, process_index: int = 0, process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches in split order; the last partial global batch is dropped."""
    images, labels = load_split(split, image_size)
    n = len(labels) if num_examples < 0 else min(num_examples, len(labels))
    _check_batch(local_batch_size, process_count, len(labels))
    global_batch = local_batch_size * process_count
    for start in range(0, n - global_batch + 1, global_batch):
        lo = start + process_index * local_batch_size
        yield {"images": images[lo:lo + local_batch_size],
               "labels": labels[lo:lo + local_batch_size]}
