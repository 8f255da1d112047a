"""tf.data pipelines for Tiny ImageNet, ImageNet (TF-slim TFRecords) and TFDS imagenet_resized.

Data directories:

* ``tiny_imagenet``: the output of ``tools/convert_tiny_imagenet.py``: ``train.tfrecord`` and
  ``validation.tfrecord`` (or ``train-00000-of-0000N.tfrecord``... shards); labels 0..199 from
  ``label/tiny_imagenet``.
* ``imagenet``: TF-slim's ImageNet conversion, ``train-00000-of-01024`` ...
  ``validation-00000-of-00128`` ...: ``image/encoded`` (JPEG), ``image/class/label`` (1..1000;
  0 is the background class of the 1001 logits) and ``image/object/bbox/{ymin,xmin,ymax,xmax}``.
* ``imagenet_tfds``: a TFDS ``imagenet_resized/64x64`` prepared beforehand (the TFDS
  ``data_dir``, or the prepared version directory itself). Nothing is downloaded here. Its
  labels are remapped by WordNet ID onto the TF-slim numbering (see ``imagenet_tfds_labels``).

Preprocessing is the original release's (``datasets/imagenet_input.py``,
``datasets/tiny_imagenet_input.py``), with seeded stateless random ops:

* ImageNet train: ``sample_distorted_bounding_box`` around the record's boxes (whole image when
  it has none; min object covered 0.1, aspect 0.75-1.33, area 0.08-1.0, 10 attempts), decode
  that crop, bicubic resize to ``image_size``, scale to [-1, 1], random left-right flip.
  ImageNet eval: central square crop of 0.875 of the shorter side, bicubic resize, scale.
* Tiny ImageNet train: a distorted crop of the whole image (the stored boxes are not used, as
  in the original; min covered 0.5, aspect 0.75-1.33, area 0.5-1.0, 20 attempts), bicubic
  resize, scale; no flip. Eval: bicubic resize only.
* imagenet_resized: the ImageNet train/eval steps applied to the stored 64x64 image (no
  boxes: crops of the whole image; eval: central 56x56 resized to ``image_size``). Its images
  were box-resized from the full photographs, so they are not the pixels the original's
  crop-then-resize produced; expect somewhat different accuracies.

Resizing is TF1's ``resize_bicubic`` as the original called it (legacy pixel centres,
``half_pixel_centers=False``), so images match what the released checkpoints saw. Unlike the
original, images are clipped to [-1, 1] after the resize (bicubic overshoots slightly).

Order and resuming. Training streams are a function of (seed, process_index, process_count)
only: epoch e reads this process's files in a seeded order (interleaved deterministically),
then a shuffle buffer seeded by (seed, process, e); the record at position q of the process's
stream is augmented with a key folded from (seed, process, q). ``start_step=k`` starts at
position k * local_batch: whole epochs are skipped without reading (their size comes from
counting the records' length headers once), the rest of the current epoch by reading (not
decoding) its records, at most one epoch of this process's share. Batch k is therefore the
same whether a run started at 0 or at k.

Multi-host: with at least ``process_count`` files each process trains on its own files
(``files[process_index::process_count]``), otherwise on every ``process_count``-th record of
one seeded order shared by all processes (which records a process gets then changes from
epoch to epoch; within an epoch the parts are disjoint and cover the data). Evaluation reads
the split in file order; global batch j is records [j*G, (j+1)*G) and process p yields rows
[p*local, (p+1)*local) of it, so results do not depend on the process count. With several
processes every process reads (but decodes only its rows of) the whole split, and the split's
records are counted first so that all processes yield the same number of batches.

TensorFlow (and tensorflow_datasets) is imported only inside these functions, and TF's view of
GPUs is hidden so that it never takes accelerator memory from JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

DATASETS = ("tiny_imagenet", "imagenet", "imagenet_tfds")
SPLITS = ("train", "validation")
TFDS_NAME = "imagenet_resized/64x64"

# The original's epoch sizes (imagenet_resized has the same ImageNet-2012 images).
PUBLISHED_SIZES = {
    "imagenet": {"train": 1_281_167, "validation": 50_000},
    "imagenet_tfds": {"train": 1_281_167, "validation": 50_000},
    "tiny_imagenet": {"train": 100_000, "validation": 10_000},
}
# Shuffle buffers in records: the original's 10,000 for Tiny ImageNet and 1,024 for ImageNet
# (~110 KB JPEGs); imagenet_resized records are ~12 KB PNGs, so 10,000 costs little.
_SHUFFLE_BUFFER = {"tiny_imagenet": 10_000, "imagenet": 1024, "imagenet_tfds": 10_000}
_CYCLE_LENGTH = 16  # files read at once in training
_READ_BUFFER = 8 * 1024 * 1024
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<ext>\.tfrecord)?$")

Batch = dict[str, np.ndarray]


@functools.cache
def _tf() -> Any:
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices were initialised already; nothing left to hide
        pass
    return tf


# ---------------------------------------------------------------------------- checks and files


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"Unknown TFRecord dataset {dataset!r}; valid: {', '.join(DATASETS)}.")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


def _check_common(dataset: str, image_size: int, local_batch_size: int, process_index: int,
                  process_count: int) -> None:
    _check_dataset(dataset)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}.")
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be positive, got {local_batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count); got process_index="
                         f"{process_index}, process_count={process_count}.")


def _check_data_dir(dataset: str, data_dir: str | None) -> str:
    if not data_dir:
        from alp_jax.data import DATA_DIR_FIELDS

        flag = DATA_DIR_FIELDS[dataset]
        raise ValueError(f"Dataset {dataset!r} needs a data directory (--{flag}); got "
                         f"{data_dir!r}.")
    if not _tf().io.gfile.isdir(data_dir):
        raise FileNotFoundError(f"Data directory for {dataset!r} does not exist: {data_dir}")
    return data_dir


def _file_pattern(dataset: str, split: str) -> str:
    return f"{split}*.tfrecord" if dataset == "tiny_imagenet" else f"{split}-*"


def _check_shard_set(files: list[str], where: str) -> None:
    """Rejects a mix of sharded and unsharded names or an incomplete ``-of-N`` set."""
    names = [os.path.basename(f) for f in files]
    matches = [m for m in map(_SHARD_RE.match, names) if m]
    if matches and len(matches) != len(names):
        plain = [n for n in names if not _SHARD_RE.match(n)]
        raise ValueError(f"{where} mixes sharded files ({matches[0].group(0)}, ...) with "
                         f"{plain[:3]}; a reader would read both. Keep one layout.")
    totals = {int(m["n"]) for m in matches}
    if len(totals) > 1:
        raise ValueError(f"{where} mixes shard sets of sizes {sorted(totals)}.")
    if totals:
        total = totals.pop()
        missing = sorted(set(range(total)) - {int(m["i"]) for m in matches})
        if missing:
            m = matches[0]
            example = f"{m['stem']}-{missing[0]:05d}-of-{total:05d}{m['ext'] or ''}"
            raise FileNotFoundError(f"{where}: {len(missing)} of {total} shards are missing "
                                    f"(e.g. {example}).")


def split_files(dataset: str, split: str, data_dir: str | None) -> list[str]:
    """Sorted TFRecord files of a split; clear errors when there are none or some are missing."""
    _check_dataset(dataset)
    _check_split(split)
    data_dir = _check_data_dir(dataset, data_dir)
    if dataset == "imagenet_tfds":
        return _tfds_files(_tfds_builder(data_dir), split)
    pattern = _file_pattern(dataset, split)
    files = sorted(_tf().io.gfile.glob(os.path.join(data_dir, pattern)))
    if not files:
        made_by = ("tools/convert_tiny_imagenet.py" if dataset == "tiny_imagenet"
                   else "TF-slim's build_imagenet_data.py")
        raise FileNotFoundError(f"No {dataset} {split} files matching {pattern!r} in "
                                f"{data_dir} (as written by {made_by}).")
    _check_shard_set(files, f"{data_dir}/{pattern}")
    return files


def _count_records_uncached(path: str) -> int:
    opener = _tf().io.gfile.GFile if "://" in path else open
    n = pos = 0
    with opener(path, "rb") as f:
        size = f.seek(0, 2)
        while pos < size:
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                break
            (length,) = struct.unpack("<Q", header)
            pos += 8 + 4 + length + 4  # length, its CRC, data, data CRC
            n += 1
    if pos != size:
        raise ValueError(f"{path} is truncated or not a TFRecord file (record {n} ends at byte "
                         f"{pos} of {size}).")
    return n


@functools.lru_cache(maxsize=4096)
def _count_records_at(path: str, size: int, mtime: int) -> int:
    del size, mtime  # cache keys: a rewritten file is counted again
    return _count_records_uncached(path)


def count_records(path: str) -> int:
    """Records in a TFRecord file, from its length headers (data is skipped, not read)."""
    stat = _tf().io.gfile.stat(path)
    return _count_records_at(path, stat.length, stat.mtime_nsec)


# ------------------------------------------------------------------------------------- TFDS


@functools.lru_cache(maxsize=8)
def _tfds_builder(data_dir: str) -> Any:
    tf = _tf()
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("Dataset 'imagenet_tfds' needs tensorflow-datasets: "
                          "pip install 'alp-jax[data]'.") from e
    from alp_jax.data import imagenet_tfds_labels

    if tf.io.gfile.exists(os.path.join(data_dir, "dataset_info.json")):
        builder = tfds.builder_from_directory(data_dir)
    else:
        builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    expected = (f"{data_dir}/imagenet_resized/64x64/<version>/ with dataset_info.json and "
                "imagenet_resized-{train,validation}.tfrecord-* files")
    if not builder.info.splits or not tf.io.gfile.exists(builder.data_dir):
        raise FileNotFoundError(f"No prepared TFDS {TFDS_NAME} in {data_dir}: expected {expected}. "
                                "Prepare it once with tfds (see README, 'Data').")
    config = getattr(builder.builder_config, "name", None)
    if builder.info.name != "imagenet_resized" or config != "64x64":
        raise ValueError(f"{builder.data_dir} holds TFDS {builder.info.name}/{config}, not "
                         f"{TFDS_NAME}.")
    names = tuple(builder.info.features["label"].names)
    if names != imagenet_tfds_labels.IMAGENET_RESIZED_WNIDS:
        raise ValueError(f"The label names stored with {builder.data_dir} differ from "
                         "alp_jax.data.imagenet_tfds_labels.IMAGENET_RESIZED_WNIDS, so the "
                         "mapping onto TF-slim labels would be wrong.")
    if "tfrecord" not in str(builder.info.file_format).lower():
        raise ValueError(f"{builder.data_dir} is stored as {builder.info.file_format}; only "
                         "TFRecord is supported (prepare it with the default file_format).")
    return builder


def _tfds_files(builder: Any, split: str) -> list[str]:
    if split not in builder.info.splits:
        raise FileNotFoundError(f"{builder.data_dir} has no {split!r} split; it has "
                                f"{list(builder.info.splits)}.")
    files = sorted(os.fspath(p) for p in builder.info.splits[split].filepaths)
    missing = [f for f in files if not _tf().io.gfile.exists(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} {split} files of "
                                f"{builder.data_dir} are missing (e.g. {missing[0]}).")
    return files


# ---------------------------------------------------------------------------- preprocessing


def _resize(image: Any, image_size: int) -> Any:
    """Float [h, w, 3] -> [S, S, 3] with TF1's resize_bicubic, as the original called it.

    TF2's tf.image.resize('bicubic') uses half-pixel centres and the a=-0.5 Keys kernel; the
    original's TF1 op used corner-aligned centres and a=-0.75, i.e. half_pixel_centers=False.
    """
    tf = _tf()
    return tf.raw_ops.ResizeBicubic(images=image[None], size=[image_size, image_size],
                                    align_corners=False, half_pixel_centers=False)[0]


def _finish(image: Any, image_size: int) -> Any:
    """uint8 crop -> resized float image in [-1, 1]."""
    tf = _tf()
    image = _resize(tf.image.convert_image_dtype(image, tf.float32), image_size)
    image = tf.clip_by_value((image - 0.5) * 2.0, -1.0, 1.0)
    return tf.reshape(image, [image_size, image_size, 3])


def _distorted_box(shape: Any, boxes: Any, seed: Any, *, min_object_covered: float,
                   area_range: tuple[float, float], max_attempts: int) -> tuple[Any, Any]:
    tf = _tf()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=boxes, seed=seed, min_object_covered=min_object_covered,
        aspect_ratio_range=(0.75, 1.33), area_range=area_range, max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True)
    return begin, size


def _central_window(shape: Any) -> Any:
    """[y, x, h, w] of the original's central square crop, 0.875 of the shorter side."""
    tf = _tf()
    height, width = shape[0], shape[1]
    crop = tf.cast(0.875 * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    return tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])


def _label_in_range(label: Any, low: int, high: int, what: str) -> Any:
    tf = _tf()
    check = tf.debugging.Assert(
        tf.logical_and(label >= low, label < high),
        [f"{what} outside [{low}, {high - 1}] (a record without labels?): ", label])
    with tf.control_dependencies([check]):
        return tf.identity(label)


@dataclasses.dataclass(frozen=True)
class _Source:
    """How to read one dataset: its files and its record -> image/label functions."""

    files: tuple[str, ...]
    parse: Callable[[Any], dict[str, Any]]
    train_image: Callable[[dict[str, Any], Any, Any, int], Any]
    eval_image: Callable[[dict[str, Any], int], Any]
    shuffle_buffer: int


def _tiny_parse(serialized: Any) -> dict[str, Any]:
    tf = _tf()
    parsed = tf.io.parse_single_example(serialized, {
        "image/encoded": tf.io.FixedLenFeature([], tf.string, ""),
        "label/tiny_imagenet": tf.io.FixedLenFeature([], tf.int64, -1)})
    label = tf.cast(parsed["label/tiny_imagenet"], tf.int32)
    return {"encoded": parsed["image/encoded"],
            "label": _label_in_range(label, 0, 200, "label/tiny_imagenet")}


def _tiny_decode(features: dict[str, Any]) -> Any:
    return _tf().io.decode_image(features["encoded"], channels=3, expand_animations=False)


def _tiny_train(features: dict[str, Any], crop_seed: Any, flip_seed: Any, size: int) -> Any:
    del flip_seed  # the original did not flip Tiny ImageNet
    tf = _tf()
    image = _tiny_decode(features)
    whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32)
    begin, box = _distorted_box(tf.shape(image), whole, crop_seed, min_object_covered=0.5,
                                area_range=(0.5, 1.0), max_attempts=20)
    return _finish(tf.slice(image, begin, box), size)


def _tiny_eval(features: dict[str, Any], size: int) -> Any:
    return _finish(_tiny_decode(features), size)


def _imagenet_parse(serialized: Any) -> dict[str, Any]:
    tf = _tf()
    keys = {"image/encoded": tf.io.FixedLenFeature([], tf.string, ""),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64, -1)}
    for c in ("ymin", "xmin", "ymax", "xmax"):
        keys[f"image/object/bbox/{c}"] = tf.io.VarLenFeature(tf.float32)
    parsed = tf.io.parse_single_example(serialized, keys)
    # [1, num_boxes, 4] in (ymin, xmin, ymax, xmax) order, as sample_distorted_bounding_box wants.
    boxes = tf.stack([parsed[f"image/object/bbox/{c}"].values
                      for c in ("ymin", "xmin", "ymax", "xmax")], axis=1)[None]
    label = tf.cast(parsed["image/class/label"], tf.int32)
    return {"encoded": parsed["image/encoded"], "boxes": boxes,
            "label": _label_in_range(label, 1, 1001, "image/class/label")}


def _imagenet_train(features: dict[str, Any], crop_seed: Any, flip_seed: Any, size: int) -> Any:
    tf = _tf()
    encoded = features["encoded"]
    begin, box = _distorted_box(tf.image.extract_jpeg_shape(encoded), features["boxes"],
                                crop_seed, min_object_covered=0.1, area_range=(0.08, 1.0),
                                max_attempts=10)
    window = tf.stack([begin[0], begin[1], box[0], box[1]])
    image = _finish(tf.image.decode_and_crop_jpeg(encoded, window, channels=3), size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _imagenet_eval(features: dict[str, Any], size: int) -> Any:
    tf = _tf()
    encoded = features["encoded"]
    window = _central_window(tf.image.extract_jpeg_shape(encoded))
    return _finish(tf.image.decode_and_crop_jpeg(encoded, window, channels=3), size)


def _tfds_parse_fn(builder: Any) -> Callable[[Any], dict[str, Any]]:
    from alp_jax.data import imagenet_tfds_labels

    table = imagenet_tfds_labels.imagenet_resized_to_slim()

    def parse(serialized: Any) -> dict[str, Any]:
        tf = _tf()
        example = builder.info.features.deserialize_example(serialized)
        label = _label_in_range(tf.cast(example["label"], tf.int32), 0, 1000,
                                "imagenet_resized label")
        return {"image": example["image"], "label": tf.gather(tf.constant(table), label)}

    return parse


def _tfds_train(features: dict[str, Any], crop_seed: Any, flip_seed: Any, size: int) -> Any:
    tf = _tf()
    image = features["image"]
    no_boxes = tf.zeros([1, 0, 4], tf.float32)  # -> the whole image, as ImageNet without boxes
    begin, box = _distorted_box(tf.shape(image), no_boxes, crop_seed, min_object_covered=0.1,
                                area_range=(0.08, 1.0), max_attempts=10)
    image = _finish(tf.slice(image, begin, box), size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _tfds_eval(features: dict[str, Any], size: int) -> Any:
    tf = _tf()
    image = features["image"]
    w = _central_window(tf.shape(image))
    return _finish(tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3]), size)


def _source(dataset: str, split: str, data_dir: str | None) -> _Source:
    files = tuple(split_files(dataset, split, data_dir))
    buffer = _SHUFFLE_BUFFER[dataset]
    if dataset == "tiny_imagenet":
        return _Source(files, _tiny_parse, _tiny_train, _tiny_eval, buffer)
    if dataset == "imagenet":
        return _Source(files, _imagenet_parse, _imagenet_train, _imagenet_eval, buffer)
    parse = _tfds_parse_fn(_tfds_builder(data_dir))
    return _Source(files, parse, _tfds_train, _tfds_eval, buffer)


# -------------------------------------------------------------------------------- pipelines


def num_examples(dataset: str, split: str, data_dir: str | None = None) -> int:
    """Examples in a split, for epoch-based schedules.

    ImageNet: the published 1,281,167 / 50,000 (counting 140 GB of shards is too slow).
    Tiny ImageNet: the records in ``data_dir`` (cheap: 110,000 small records), or the published
    100,000 / 10,000 without a directory. imagenet_tfds: the prepared split's size from TFDS.
    """
    _check_dataset(dataset)
    _check_split(split)
    if dataset == "imagenet" or data_dir is None:
        return PUBLISHED_SIZES[dataset][split]
    if dataset == "imagenet_tfds":
        builder = _tfds_builder(_check_data_dir(dataset, data_dir))
        if split not in builder.info.splits:
            raise FileNotFoundError(f"{builder.data_dir} has no {split!r} split.")
        return int(builder.info.splits[split].num_examples)
    return sum(count_records(f) for f in split_files(dataset, split, data_dir))


def _options(tf: Any) -> Any:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _as_numpy(ds: Any) -> Iterator[Batch]:
    return iter(ds.as_numpy_iterator())


def train_dataset(dataset: str, data_dir: str | None, image_size: int, local_batch_size: int,
                  *, seed: int = 0, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0) -> Any:
    """The tf.data.Dataset behind ``train_iterator`` (see the module docstring for its order)."""
    _check_common(dataset, image_size, local_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}.")
    tf = _tf()
    source = _source(dataset, "train", data_dir)
    files = list(source.files)
    by_file = len(files) >= process_count
    mine = files[process_index::process_count] if by_file else files
    # An empty share would make the endless epoch loop below spin without yielding.
    if by_file and all(tf.io.gfile.stat(f).length == 0 for f in mine):
        raise ValueError(f"Process {process_index} of {process_count} reads only empty files: "
                         f"{mine}.")
    if not by_file and sum(count_records(f) for f in files) < process_count:
        raise ValueError(f"{sum(count_records(f) for f in files)} training records in "
                         f"{list(files)} cannot be shared by {process_count} processes.")
    start = start_step * local_batch_size
    first_epoch = skip = 0
    if start:
        total = sum(count_records(f) for f in mine)
        per_process = total if by_file else len(range(process_index, total, process_count))
        first_epoch, skip = divmod(start, per_process)

    fold = tf.random.experimental.stateless_fold_in
    root = tf.constant([seed, 0], tf.int64)
    file_key = fold(root, 1)  # the same in every process: shard() needs one record order
    process_key = fold(fold(root, 2), process_index)
    shuffle_key, augment_key = fold(process_key, 1), fold(process_key, 2)
    files_t = tf.constant(mine)
    cycle = min(_CYCLE_LENGTH, len(mine))

    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch: Any) -> Any:
        order = tf.argsort(tf.random.stateless_uniform([len(mine)], seed=fold(file_key, epoch)))
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order))
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER),
                           cycle_length=cycle, block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if not by_file:
            ds = ds.shard(process_count, process_index)
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=fold(shuffle_key, epoch), minval=None, maxval=None, dtype=tf.int64)
        return ds.shuffle(source.shuffle_buffer, seed=shuffle_seed)

    @tf.autograph.experimental.do_not_convert
    def preprocess(position: Any, serialized: Any) -> dict[str, Any]:
        seeds = tf.random.experimental.stateless_split(fold(augment_key, position), 2)
        features = source.parse(serialized)
        image = source.train_image(features, seeds[0], seeds[1], image_size)
        return {"images": image, "labels": features["label"]}

    ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch_records)
    ds = ds.skip(skip).enumerate(start=start)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(tf))


def train_iterator(dataset: str, data_dir: str | None, image_size: int, local_batch_size: int,
                   *, seed: int = 0, process_index: int = 0, process_count: int = 1,
                   start_step: int = 0) -> Iterator[Batch]:
    """Infinite augmented batches of this process; batch k depends on (seed, process, k) only."""
    return _as_numpy(train_dataset(
        dataset, data_dir, image_size, local_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, start_step=start_step))


def eval_dataset(dataset: str, data_dir: str | None, image_size: int, local_batch_size: int,
                 *, split: str = "validation", num_examples: int = -1, process_index: int = 0,
                 process_count: int = 1) -> Any:
    """The tf.data.Dataset behind ``eval_iterator``."""
    _check_common(dataset, image_size, local_batch_size, process_index, process_count)
    _check_split(split)
    tf = _tf()
    source = _source(dataset, split, data_dir)
    ds = tf.data.TFRecordDataset(list(source.files), buffer_size=_READ_BUFFER)
    if process_count > 1:
        # Every process must yield the same number of batches, so the split size is needed.
        total = sum(count_records(f) for f in source.files)
        n = total if num_examples < 0 else min(num_examples, total)
        global_batch = local_batch_size * process_count
        ds = ds.take(n // global_batch * global_batch).enumerate()
        ds = ds.filter(lambda i, _: (i // local_batch_size) % process_count == process_index)
        ds = ds.map(lambda _, record: record)
    elif num_examples >= 0:
        ds = ds.take(num_examples)

    @tf.autograph.experimental.do_not_convert
    def preprocess(serialized: Any) -> dict[str, Any]:
        features = source.parse(serialized)
        return {"images": source.eval_image(features, image_size), "labels": features["label"]}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(tf))


def eval_iterator(dataset: str, data_dir: str | None, image_size: int, local_batch_size: int,
                  *, split: str = "validation", num_examples: int = -1, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
    """Finite eval batches in file order; ``num_examples`` counts over all processes (-1: all)."""
    return _as_numpy(eval_dataset(
        dataset, data_dir, image_size, local_batch_size, split=split, num_examples=num_examples,
        process_index=process_index, process_count=process_count))
