"""Writers of miniature data sets for tests: a tiny-imagenet-200/ tree, TF-slim ImageNet shards
and a prepared TFDS imagenet_resized/64x64.

Images are flat colours that encode an index (``color_of`` / ``index_of``), so a test can tell
from a decoded, cropped and resized image which record it came from and check its label.
Only ``write_imagenet_shards`` and ``write_imagenet_resized`` need TensorFlow.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from collections.abc import Sequence
from types import ModuleType

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(REPO, "tools", "convert_tiny_imagenet.py")

# Real WordNet IDs (goldfish, Egyptian cat, European fire salamander, reel), deliberately not in
# sorted order: Tiny ImageNet labels follow wnids.txt's order.
TINY_WNIDS = ("n02124075", "n01443537", "n01629819", "n04067472")
_STEP = 10


def load_converter() -> ModuleType:
    """tools/convert_tiny_imagenet.py as a module (tools/ is not a package), loaded once:
    it defines absl flags, which may be defined only once per process."""
    name = "convert_tiny_imagenet"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CONVERTER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def color_of(index: int) -> tuple[int, int, int]:
    """A flat RGB colour for ``index`` (0..23), told apart by its red channel."""
    if not 0 <= index < 24:
        raise ValueError(f"colour index must be in [0, 24), got {index}")
    return (8 + _STEP * index, 120, 250 - _STEP * index)


def index_of(image: np.ndarray) -> int:
    """The colour index of an image in [-1, 1] (float) written with ``color_of``."""
    red = (float(np.mean(image[..., 0])) + 1.0) / 2.0 * 255.0
    return int(round((red - 8) / _STEP))


def jpeg_bytes(array: np.ndarray, quality: int = 95, subsampling: int = -1) -> bytes:
    """JPEG of a uint8 [h, w, 3] array; ``subsampling=0`` keeps full-resolution colour."""
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="JPEG", quality=quality,
                                                 subsampling=subsampling)
    return buf.getvalue()


def flat_image(index: int, height: int, width: int) -> np.ndarray:
    return np.broadcast_to(np.array(color_of(index), np.uint8), (height, width, 3)).copy()


def dark_left_image(height: int, width: int) -> np.ndarray:
    """Black left half, white right half: a left-right flip is visible after any crop."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2:] = 255
    return image


def write_tiny_imagenet_tree(root: str, wnids: Sequence[str] = TINY_WNIDS, train_per_class: int = 5,
                             val_per_class: int = 2, num_test: int = 3, seed: int = 0) -> str:
    """Writes ``root/tiny-imagenet-200`` like the real archive; returns its path.

    Images are 64x64 JPEGs of colour ``color_of(i)`` for the i-th wnid of wnids.txt; test
    images use colour 23.
    """
    rng = np.random.RandomState(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"))
    os.makedirs(os.path.join(base, "test", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))

    def box() -> str:
        x1, y1 = rng.randint(0, 30, 2)
        x2, y2 = rng.randint(34, 64, 2)
        return f"{x1}\t{y1}\t{x2}\t{y2}"

    for i, wnid in enumerate(wnids):
        images = os.path.join(base, "train", wnid, "images")
        os.makedirs(images)
        rows = []
        for j in range(train_per_class):
            name = f"{wnid}_{j}.JPEG"
            with open(os.path.join(images, name), "wb") as f:
                f.write(jpeg_bytes(flat_image(i, 64, 64)))
            rows.append(f"{name}\t{box()}\n")
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("".join(rows))
    rows, k = [], 0
    for _ in range(val_per_class):
        for i, wnid in enumerate(wnids):
            name = f"val_{k}.JPEG"
            with open(os.path.join(base, "val", "images", name), "wb") as f:
                f.write(jpeg_bytes(flat_image(i, 64, 64)))
            rows.append(f"{name}\t{wnid}\t{box()}\n")
            k += 1
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("".join(rows))
    for j in range(num_test):
        with open(os.path.join(base, "test", "images", f"test_{j}.JPEG"), "wb") as f:
            f.write(jpeg_bytes(flat_image(23, 64, 64)))
    return base


def _feature(value) -> object:
    import tensorflow as tf

    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in value]))


def slim_example(image: np.ndarray, label: int, boxes: np.ndarray | None = None,
                 subsampling: int = -1) -> bytes:
    """A TF-slim ImageNet record (the features of TF-slim's build_imagenet_data.py).

    ``boxes``: [n, 4] normalised (ymin, xmin, ymax, xmax); None or n = 0 for no box.
    """
    import tensorflow as tf

    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)
    height, width = image.shape[:2]
    feature = {
        "image/height": int(height), "image/width": int(width), "image/colorspace": b"RGB",
        "image/channels": 3, "image/class/label": int(label),
        "image/class/synset": b"n00000000", "image/class/text": b"fake",
        "image/object/bbox/ymin": boxes[:, 0], "image/object/bbox/xmin": boxes[:, 1],
        "image/object/bbox/ymax": boxes[:, 2], "image/object/bbox/xmax": boxes[:, 3],
        "image/format": b"JPEG", "image/filename": b"fake.JPEG",
        "image/encoded": jpeg_bytes(image, subsampling=subsampling),
    }
    return tf.train.Example(features=tf.train.Features(
        feature={k: _feature(v) for k, v in feature.items()})).SerializeToString()


def tiny_example(image: np.ndarray, label: int) -> bytes:
    """A Tiny ImageNet record with the converter's train/validation features (box unused)."""
    import tensorflow as tf

    feature = {"image/encoded": jpeg_bytes(image), "image/format": b"jpeg",
               "label/wnid": b"n00000000", "label/tiny_imagenet": int(label),
               "bbox/xmin": 0, "bbox/ymin": 0, "bbox/xmax": 1, "bbox/ymax": 1}
    return tf.train.Example(features=tf.train.Features(
        feature={k: _feature(v) for k, v in feature.items()})).SerializeToString()


def write_records(path: str, records: Sequence[bytes]) -> str:
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for r in records:
            writer.write(r)
    return path


def write_imagenet_shards(data_dir: str, split: str, num_shards: int, per_shard: int,
                          seed: int = 0) -> list[int]:
    """TF-slim-style ``<split>-0000i-of-0000N`` shards; returns the labels in file order.

    Record k (over all shards) has label k + 1 and a flat image of colour ``color_of(k)``,
    40 to 90 pixels a side, with 0 to 2 boxes.
    """
    rng = np.random.RandomState(seed)
    labels, k = [], 0
    for s in range(num_shards):
        records = []
        for _ in range(per_shard):
            height, width = rng.randint(40, 91, 2)
            lo = rng.uniform(0.0, 0.4, (rng.randint(0, 3), 2))
            boxes = np.concatenate([lo, lo + rng.uniform(0.2, 0.6, lo.shape)], axis=1)
            records.append(slim_example(flat_image(k, height, width), k + 1, boxes))
            labels.append(k + 1)
            k += 1
        write_records(os.path.join(data_dir, f"{split}-{s:05d}-of-{num_shards:05d}"), records)
    return labels


def write_imagenet_resized(data_dir: str, labels: dict[str, Sequence[int]],
                           num_shards: int = 2) -> str:
    """A prepared TFDS ``imagenet_resized/64x64`` under ``data_dir``; returns its version dir.

    ``labels[split]`` are imagenet_resized label indices (0..999); example k of a split is a
    flat image of colour ``color_of(k)``. Written with TFDS's own feature encoding and
    metadata, so ``tfds.builder(..., data_dir=data_dir)`` reads it like a real preparation.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet_resized/64x64", data_dir=data_dir)
    os.makedirs(builder.data_dir)
    split_infos = []
    for split, split_labels in labels.items():
        chunks = np.array_split(np.arange(len(split_labels)), num_shards)
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="imagenet_resized", split=split, filetype_suffix="tfrecord")
        for s, idx in enumerate(chunks):
            path = os.path.join(builder.data_dir, f"imagenet_resized-{split}.tfrecord-"
                                f"{s:05d}-of-{num_shards:05d}")
            with tf.io.TFRecordWriter(path) as writer:
                for k in idx:
                    writer.write(builder.info.features.serialize_example(
                        {"image": flat_image(int(k), 64, 64), "label": int(split_labels[k])}))
        split_infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[len(c) for c in chunks], num_bytes=0,
            filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_dir)
    return os.fspath(builder.data_dir)
