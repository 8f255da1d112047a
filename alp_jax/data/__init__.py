"""Input pipelines. Every pipeline yields dicts of NumPy arrays.

``images``: float32 [local_batch, H, W, 3] in [-1, 1]; ``labels``: int32 [local_batch].

Each JAX process reads a disjoint part of the data and yields only its local share of
the global batch (``local_batch = global_batch // process_count``). Training iterators
are infinite, deterministic for a given (seed, process_index, process_count) and can
start at any step (``start_step``) so a resumed run continues the data order.
Evaluation iterators are finite and drop the last partial batch, as the original did.

TensorFlow is imported only by the TFRecord/TFDS pipelines, never by the digits one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from alp_jax.errors import ConfigError

Batch = dict[str, np.ndarray]

DATASETS = ("digits", "tiny_imagenet", "imagenet", "imagenet_tfds")

_NUM_CLASSES = {"digits": 10, "tiny_imagenet": 200, "imagenet": 1001, "imagenet_tfds": 1001}


# The config field (and flag) holding each dataset's directory; digits ships with
# scikit-learn and reads none.
DATA_DIR_FIELDS = {"digits": None, "tiny_imagenet": "tiny_imagenet_data_dir",
                   "imagenet": "imagenet_data_dir", "imagenet_tfds": "imagenet_data_dir"}


def _check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}.")


def data_dir(cfg) -> str | None:
    """The directory ``cfg.dataset`` reads (its ``DATA_DIR_FIELDS`` field; None for
    digits or when unset)."""
    _check_dataset(cfg.dataset)
    field = DATA_DIR_FIELDS[cfg.dataset]
    return (getattr(cfg, field) or None) if field else None


def check_data_dir(dataset: str, directory: str | None) -> None:
    """Raises ConfigError / FileNotFoundError naming the flag when ``dataset`` needs a
    directory and ``directory`` is unset or not one."""
    _check_dataset(dataset)
    field = DATA_DIR_FIELDS[dataset]
    if field is None:
        return
    if not directory:
        raise ConfigError(f"--dataset={dataset} needs --{field}.")
    if "://" not in directory and not os.path.isdir(directory):  # URLs: the reader checks
        raise FileNotFoundError(f"--{field}={directory!r} is not a directory.")


def _tfrecord_datasets():
    """The TFRecord/TFDS pipelines, or a clear error when TensorFlow is not installed."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(
            "The ImageNet / Tiny ImageNet input pipelines read TFRecords with TensorFlow, "
            "which is not installed: pip install -e '.[data]' (only --dataset=digits works "
            "without it).") from None
    from alp_jax.data import tfrecord_datasets

    return tfrecord_datasets


def check_available(dataset: str) -> None:
    """Raises before anything is written if ``dataset`` cannot be read here."""
    _check_dataset(dataset)
    if dataset != "digits":
        _tfrecord_datasets()


def num_classes(dataset: str) -> int:
    """Number of logits a model for ``dataset`` has (ImageNet keeps the background class 0)."""
    _check_dataset(dataset)
    return _NUM_CLASSES[dataset]


def num_examples(dataset: str, split: str, data_dir: str | None = None) -> int:
    """Examples in a split (used for epochs and learning-rate schedules)."""
    _check_dataset(dataset)
    if dataset == "digits":
        from alp_jax.data import digits

        return digits.num_examples(split)
    return _tfrecord_datasets().num_examples(dataset, split, data_dir)


def check_num_examples(dataset: str, split: str, requested: int,
                       data_dir: str | None = None) -> None:
    """Raises ValueError when ``requested`` examples (-1: the whole split) are more than
    ``split`` holds: an evaluation would otherwise cover the whole split and report it as
    the number asked for.

    ImageNet's split sizes are the published ones (its shards are not counted), so a
    directory holding only some of them passes.
    """
    if requested < 0:
        return
    n = num_examples(dataset, split, data_dir)
    if requested > n:
        raise ValueError(
            f"num_examples={requested} is more than the {n} examples of the {dataset} "
            f"{split} split; pass at most {n}, or -1 for the whole split.")


def train_iterator(
    dataset: str,
    data_dir: str | None,
    image_size: int,
    local_batch_size: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Infinite, shuffled, augmented training batches for this process."""
    _check_dataset(dataset)
    if dataset == "digits":
        from alp_jax.data import digits

        return digits.train_iterator(
            image_size, local_batch_size, seed=seed, process_index=process_index,
            process_count=process_count, start_step=start_step)
    return _tfrecord_datasets().train_iterator(
        dataset, data_dir, image_size, local_batch_size, seed=seed,
        process_index=process_index, process_count=process_count, start_step=start_step)


def eval_iterator(
    dataset: str,
    data_dir: str | None,
    image_size: int,
    local_batch_size: int,
    *,
    split: str = "validation",
    num_examples: int = -1,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Finite evaluation batches (eval preprocessing, no shuffling, last partial batch dropped).

    ``num_examples`` counts examples over all processes (-1: the whole split); more than
    the split holds is an error.
    """
    _check_dataset(dataset)
    check_num_examples(dataset, split, num_examples, data_dir)
    if dataset == "digits":
        from alp_jax.data import digits

        return digits.eval_iterator(
            image_size, local_batch_size, split=split, num_examples=num_examples,
            process_index=process_index, process_count=process_count)
    return _tfrecord_datasets().eval_iterator(
        dataset, data_dir, image_size, local_batch_size, split=split,
        num_examples=num_examples, process_index=process_index, process_count=process_count)
