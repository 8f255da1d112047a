"""Decoded images per second of each TFRecord/TFDS input pipeline on this machine (issue 4).

Writes its own synthetic data of realistic size into a temporary directory (Tiny ImageNet:
64x64 JPEGs, ~2-3 KB, in the converter's format; ImageNet: ~400x350 JPEGs, ~50-100 KB, in
TF-slim shards with one box each; imagenet_resized: a prepared TFDS 64x64 with PNG images,
when tensorflow-datasets is installed), then times ``alp_jax.data`` train and eval iterators:

    python benchmarks/input_pipeline.py --batch_size 64 --batches 40 --image_size 64

Prints one JSON line per (pipeline, mode), then a table. ``images_per_s`` is images yielded
per second after ``--warmup_batches`` (pipeline start-up, shuffle-buffer fill and the first
batches are excluded; ``first_batch_s`` reports them). The pipelines use every core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``alp_jax`` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alp_jax import data, provenance  # noqa: E402

PIPELINES = ("tiny_imagenet", "imagenet", "imagenet_tfds")


def _natural_image(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """Smooth colour fields plus grain: compresses like a photo, unlike white noise."""
    from PIL import Image

    coarse = rng.randint(0, 256, (max(2, height // 40), max(2, width // 40), 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    grain = rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _example(tf: Any, feats: dict[str, Any]) -> bytes:
    def feature(v):
        if isinstance(v, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        if isinstance(v, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))

    return tf.train.Example(features=tf.train.Features(
        feature={k: feature(v) for k, v in feats.items()})).SerializeToString()


def write_tiny_imagenet(tf: Any, out: str, records: int, seed: int = 0) -> int:
    """train.tfrecord / validation.tfrecord as tools/convert_tiny_imagenet.py writes them."""
    rng = np.random.RandomState(seed)
    nbytes = 0
    for split in ("train", "validation"):
        with tf.io.TFRecordWriter(os.path.join(out, f"{split}.tfrecord")) as w:
            for i in range(records):
                encoded = _jpeg(_natural_image(rng, 64, 64))
                nbytes += len(encoded)
                w.write(_example(tf, {
                    "image/encoded": encoded, "image/format": b"jpeg",
                    "label/wnid": b"n01443537", "label/tiny_imagenet": i % 200,
                    "bbox/xmin": 5, "bbox/ymin": 5, "bbox/xmax": 50, "bbox/ymax": 60}))
    return nbytes // (2 * records)


def write_imagenet(tf: Any, out: str, records: int, shards: int = 8, seed: int = 0) -> int:
    """TF-slim ``train-0000i-of-0000N`` / ``validation-...`` shards of ~400x350 JPEGs."""
    rng = np.random.RandomState(seed)
    nbytes = 0
    per_shard = max(1, records // shards)
    for split in ("train", "validation"):
        for s in range(shards):
            path = os.path.join(out, f"{split}-{s:05d}-of-{shards:05d}")
            with tf.io.TFRecordWriter(path) as w:
                for i in range(per_shard):
                    height, width = rng.randint(300, 420), rng.randint(330, 500)
                    encoded = _jpeg(_natural_image(rng, height, width))
                    nbytes += len(encoded)
                    ymin, xmin = rng.uniform(0, 0.3, 2)
                    w.write(_example(tf, {
                        "image/encoded": encoded, "image/format": b"JPEG",
                        "image/height": int(height), "image/width": int(width),
                        "image/class/label": 1 + i % 1000,
                        "image/object/bbox/ymin": [ymin], "image/object/bbox/xmin": [xmin],
                        "image/object/bbox/ymax": [ymin + 0.6], "image/object/bbox/xmax":
                            [xmin + 0.6]}))
    return nbytes // (2 * per_shard * shards)


def write_imagenet_resized(tf: Any, out: str, records: int, seed: int = 0) -> int:
    """A prepared TFDS imagenet_resized/64x64 (TFDS's own encoding: PNG images)."""
    import tensorflow_datasets as tfds

    rng = np.random.RandomState(seed)
    builder = tfds.builder("imagenet_resized/64x64", data_dir=out)
    os.makedirs(builder.data_dir)
    infos, nbytes = [], 0
    for split in ("train", "validation"):
        path = os.path.join(builder.data_dir, f"imagenet_resized-{split}.tfrecord-00000-of-00001")
        with tf.io.TFRecordWriter(path) as w:
            for i in range(records):
                record = builder.info.features.serialize_example(
                    {"image": _natural_image(rng, 64, 64), "label": i % 1000})
                nbytes += len(record)
                w.write(record)
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name="imagenet_resized", split=split, filetype_suffix="tfrecord")
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[records], num_bytes=0,
                                         filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)
    return nbytes // (2 * records)


def time_pipeline(dataset: str, data_dir: str, mode: str, image_size: int, batch_size: int,
                  batches: int, warmup: int) -> dict[str, float]:
    """Seconds to the first batch and images/s over ``batches`` batches after ``warmup``."""
    t0 = time.perf_counter()
    if mode == "train":
        it = data.train_iterator(dataset, data_dir, image_size, batch_size, seed=0)
    else:
        it = _cycle_eval(dataset, data_dir, image_size, batch_size)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    checksum = 0.0
    for _ in range(batches):
        b = next(it)
        checksum += float(b["images"][0, 0, 0, 0])  # touch the data: it must be real
    seconds = time.perf_counter() - t0
    return {"first_batch_s": first, "seconds": seconds,
            "images_per_s": batches * batch_size / seconds}


def _cycle_eval(dataset: str, data_dir: str, image_size: int, batch_size: int):
    # The eval split is finite; restart it (a new pass costs a pipeline start, as in eval).
    while True:
        yield from data.eval_iterator(dataset, data_dir, image_size, batch_size)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help=f"comma-separated subset of {', '.join(PIPELINES)}")
    p.add_argument("--modes", default="train,eval", help="train, eval or both")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per pipeline")
    p.add_argument("--warmup_batches", type=int, default=5)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--tiny_records", type=int, default=4000, help="records per split")
    p.add_argument("--imagenet_records", type=int, default=640, help="records per split")
    p.add_argument("--workdir", default=None, help="where to write the data (default: a "
                   "temporary directory, removed at the end)")
    args = p.parse_args(argv)
    pipelines = [s for s in args.pipelines.split(",") if s]
    modes = [s for s in args.modes.split(",") if s]
    for name in pipelines:
        if name not in PIPELINES:
            p.error(f"unknown pipeline {name!r}; valid: {', '.join(PIPELINES)}")
    for mode in modes:
        if mode not in ("train", "eval"):
            p.error(f"unknown mode {mode!r}; valid: train, eval")

    import tensorflow as tf

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        writers = {"tiny_imagenet": lambda d: write_tiny_imagenet(tf, d, args.tiny_records),
                   "imagenet": lambda d: write_imagenet(tf, d, args.imagenet_records),
                   "imagenet_tfds": lambda d: write_imagenet_resized(tf, d, args.tiny_records)}
        for name in pipelines:
            if name == "imagenet_tfds":
                try:
                    import tensorflow_datasets  # noqa: F401
                except ImportError:
                    print(f"# skipping {name}: tensorflow-datasets is not installed",
                          file=sys.stderr)
                    continue
            data_dir = os.path.join(root, name)
            os.makedirs(data_dir)
            t0 = time.perf_counter()
            record_bytes = writers[name](data_dir)
            print(f"# wrote {name} data in {time.perf_counter() - t0:.1f}s "
                  f"(~{record_bytes / 1024:.1f} KB per image)", file=sys.stderr)
            for mode in modes:
                timing = time_pipeline(name, data_dir, mode, args.image_size, args.batch_size,
                                       args.batches, args.warmup_batches)
                row = {"pipeline": name, "mode": mode, "image_size": args.image_size,
                       "batch_size": args.batch_size, "batches": args.batches,
                       "record_kb": round(record_bytes / 1024, 1),
                       "images_per_s": round(timing["images_per_s"], 1),
                       "first_batch_s": round(timing["first_batch_s"], 2),
                       "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
                       "machine": platform.machine(),
                       "provenance": provenance.record()}
                print(json.dumps(row), flush=True)
                results.append(row)
    print()
    print(f"{'pipeline':<15}{'mode':<7}{'KB/image':>9}{'images/s':>11}{'first batch s':>15}")
    for r in results:
        print(f"{r['pipeline']:<15}{r['mode']:<7}{r['record_kb']:>9.1f}{r['images_per_s']:>11.1f}"
              f"{r['first_batch_s']:>15.2f}")
    return results


if __name__ == "__main__":
    main()
