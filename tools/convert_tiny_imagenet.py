"""Converts the extracted Tiny ImageNet archive (``tiny-imagenet-200/``) to TFRecord files.

    python tools/convert_tiny_imagenet.py --input_dir=tiny-imagenet-200 \\
        --output_dir=tiny-imagenet-tfrecord [--imagenet_synsets_path=synsets.txt] \\
        [--seed=0] [--num_shards=1]

Outputs, in ``--output_dir``:

* ``--num_shards=1`` (default, the original's layout): ``train.tfrecord`` (shuffled),
  ``validation.tfrecord`` and ``test.tfrecord``.
* ``--num_shards=N``: every split in N files ``<split>-<i>-of-<N>.tfrecord`` with 5-digit
  i and N, e.g. ``train-00000-of-00004.tfrecord``; shard i holds the i-th contiguous slice of
  the split's order. Several files let several hosts each read their own files.

Every train and validation record is a ``tf.train.Example`` with the original converter's
features: ``image/encoded`` (the file's bytes, unchanged), ``image/format`` (``jpeg`` or
``png``, from the file extension), ``label/wnid`` (bytes), ``label/tiny_imagenet`` (int64,
the wnid's line index in ``wnids.txt``, 0..199, file order, not sorted), ``label/imagenet``
(int64, line index in the synsets file + 1, 1..1000; only with ``--imagenet_synsets_path``)
and ``bbox/xmin``, ``bbox/ymin``, ``bbox/xmax``, ``bbox/ymax`` (int64 pixel coordinates as
in the annotation files, not normalised). Test records have only ``image/encoded`` and
``image/format``: the archive has no test labels.

Departures from the original: the train order is a seeded permutation (the original's
``random.shuffle`` was unseeded); ``label/wnid`` is one bytes value (the original passed a
string where a list was expected, which stored one entry per character); the input is
validated, every image decoded once, before anything is written; outputs are written under
temporary names and renamed only when every file is complete.

A killed conversion leaves only hidden temporary files (``.train.tfrecord.tmp-PID``), which
the next conversion into the directory removes; one killed while renaming leaves some of
its new files and none of the earlier conversion's (they are deleted before the first
rename), never a full set mixing two conversions. Free space is checked before writing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

SPLITS = ("train", "validation", "test")
_MAX_LISTED = 20

FLAGS = flags.FLAGS
flags.DEFINE_string("input_dir", None, "The extracted tiny-imagenet-200 directory.")
flags.DEFINE_string("output_dir", None, "Where to write the TFRecord files (created if needed).")
flags.DEFINE_string("imagenet_synsets_path", None,
                    "Optional: ImageNet synsets file (one wnid a line, e.g. TF-slim's "
                    "imagenet_lsvrc_2015_synsets.txt); adds label/imagenet = line index + 1.")
flags.DEFINE_integer("seed", 0, "Seed of the train split's shuffle.")
flags.DEFINE_integer("num_shards", 1, "Files per split; >1 writes <split>-0000i-of-0000N.tfrecord.")


class ConversionError(ValueError):
    """The input directory is incomplete or holds unreadable files; nothing was written."""


class ConversionWriteError(ConversionError, OSError):
    """Writing the outputs failed (e.g. a full disk); the temporary files were removed and the
    earlier outputs are untouched."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image: its path, its wnid and box (None for test images)."""

    path: str
    wnid: str | None = None
    box: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 in pixels


def _fail(what: str, problems: Sequence[str]) -> None:
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED \
            else ""
        raise ConversionError(f"{what} ({len(problems)} problem(s)):\n  {listed}{more}")


def read_wnid_list(path: str, what: str) -> list[str]:
    """Non-empty stripped lines of a wnid list, in file order; errors on duplicates."""
    if not os.path.isfile(path):
        raise ConversionError(f"{what} not found: {path}")
    with open(path) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids:
        raise ConversionError(f"{what} is empty: {path}")
    bad = [w for w in wnids if not re.fullmatch(r"n\d{8}", w)]
    if bad:
        raise ConversionError(f"{what} {path}: not WordNet IDs (n + 8 digits): {bad[:5]}")
    dups = sorted({w for w in wnids if wnids.count(w) > 1})
    if dups:
        raise ConversionError(f"{what} {path} lists these wnids more than once: {dups[:5]}")
    return wnids


def _image_format(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith((".jpeg", ".jpg")):
        return "jpeg"
    if lower.endswith(".png"):
        return "png"
    return None


def _read_table(path: str, columns: list[str], images_dir: str, problems: list[str],
                wnid: str | None = None) -> list[Entry]:
    """Reads a tab-separated annotation file (filename, [wnid,] x1, y1, x2, y2)."""
    import pandas as pd

    if not os.path.isfile(path):
        problems.append(f"missing annotation file {path}")
        return []
    try:
        table = pd.read_csv(path, sep="\t", header=None, names=columns, dtype=str,
                            keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        problems.append(f"unreadable annotation file {path}: {str(e).strip()}")
        return []
    if table.empty:
        problems.append(f"annotation file {path} has no rows")
    entries = []
    for line, row in enumerate(table.itertuples(index=False), start=1):
        where = f"{path}:{line}"
        try:
            box = tuple(int(getattr(row, c)) for c in ("x1", "y1", "x2", "y2"))
        except (TypeError, ValueError):
            problems.append(f"{where}: box coordinates are not integers: {tuple(row)}")
            continue
        image = os.path.join(images_dir, row.filename)
        if not row.filename or not os.path.isfile(image):
            problems.append(f"{where}: names image {row.filename!r}, but {image} does not exist")
            continue
        entries.append(Entry(image, wnid if wnid is not None else row.wnid, box))
    return entries


def read_annotations(input_dir: str) -> tuple[list[str], dict[str, list[Entry]]]:
    """Reads wnids.txt and every split's annotations; raises ConversionError listing problems.

    Returns (wnids in file order, {split: entries}); train entries are in wnids.txt order,
    each class in its box file's order; test images are sorted by name.
    """
    if not os.path.isdir(input_dir):
        raise ConversionError(f"--input_dir {input_dir!r} is not a directory; expected the "
                              "extracted tiny-imagenet-200/ folder.")
    wnids = read_wnid_list(os.path.join(input_dir, "wnids.txt"), "wnids.txt")
    known = set(wnids)
    problems: list[str] = []
    for sub in ("train", "val", os.path.join("val", "images"), "test",
                os.path.join("test", "images")):
        if not os.path.isdir(os.path.join(input_dir, sub)):
            problems.append(f"missing directory {os.path.join(input_dir, sub)}")
    _fail(f"Input {input_dir} is not a complete tiny-imagenet-200 directory", problems)

    train_dir = os.path.join(input_dir, "train")
    for name in sorted(os.listdir(train_dir)):
        if not name.startswith("n"):
            logging.warning("Ignoring %s: not a class directory.", os.path.join(train_dir, name))
        elif name not in known:
            problems.append(f"class directory {os.path.join(train_dir, name)} is not listed in "
                            "wnids.txt")
    train: list[Entry] = []
    for wnid in wnids:
        class_dir = os.path.join(train_dir, wnid)
        if not os.path.isdir(class_dir):
            problems.append(f"wnids.txt lists {wnid}, but {class_dir} is missing")
            continue
        train += _read_table(os.path.join(class_dir, f"{wnid}_boxes.txt"),
                             ["filename", "x1", "y1", "x2", "y2"],
                             os.path.join(class_dir, "images"), problems, wnid=wnid)

    val_dir = os.path.join(input_dir, "val")
    val = _read_table(os.path.join(val_dir, "val_annotations.txt"),
                      ["filename", "wnid", "x1", "y1", "x2", "y2"],
                      os.path.join(val_dir, "images"), problems)
    for e in val:
        if e.wnid not in known:
            problems.append(f"val_annotations.txt: {os.path.basename(e.path)} has wnid "
                            f"{e.wnid!r}, which wnids.txt does not list")

    test_images = os.path.join(input_dir, "test", "images")
    # The original took only .JPEG files from test/images.
    test = [Entry(os.path.join(test_images, f)) for f in sorted(os.listdir(test_images))
            if f.endswith(".JPEG")]
    if not test:
        problems.append(f"no .JPEG images in {test_images}")
    for e in train + val + test:
        if _image_format(e.path) is None:
            problems.append(f"{e.path}: not a .jpeg/.jpg/.png file")
    _fail(f"Input {input_dir} has missing or malformed annotations", problems)
    return wnids, {"train": train, "validation": val, "test": test}


def _decode_problem(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() misses truncated JPEG data
    except Exception as e:  # noqa: BLE001 - any decoder failure means an unusable image
        return f"{path}: does not decode ({type(e).__name__}: {e})"
    return None


def check_images(entries: Sequence[Entry], workers: int | None = None) -> None:
    """Decodes every image once; raises ConversionError naming those that fail."""
    paths = [e.path for e in entries]
    problems: list[str] = []
    step = max(1000, len(paths) // 10)
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for i, problem in enumerate(pool.map(_decode_problem, paths, chunksize=64), start=1):
            if problem:
                problems.append(problem)
            if i % step == 0 or i == len(paths):
                logging.info("Checked %d/%d images (%d unreadable).", i, len(paths),
                             len(problems))
    _fail("Some images do not decode", problems)


def shard_names(split: str, num_shards: int) -> list[str]:
    """File names of a split: ``train.tfrecord`` or ``train-00000-of-00004.tfrecord``..."""
    if num_shards == 1:
        return [f"{split}.tfrecord"]
    return [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


_TEMP = re.compile(r"\.(?:train|validation|test)(?:\.tfrecord|-\d{5}-of-\d{5}\.tfrecord)"
                   r"\.tmp-(\d+)")


def _temp_name(final: str) -> str:
    """Hidden, so that a reader's ``train*.tfrecord`` pattern never matches it."""
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Removes the temporary files of killed conversions from ``output_dir``; returns them.

    Raises ConversionError when a conversion that is still running (its process exists)
    owns one: two conversions into one directory would replace each other's files.
    """
    removed = []
    for name in sorted(os.listdir(output_dir)):
        m = _TEMP.fullmatch(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _process_alive(pid):
            raise ConversionError(
                f"{os.path.join(output_dir, name)} belongs to process {pid}, which is running: "
                f"another conversion is writing into {output_dir}. Wait for it, choose another "
                "--output_dir, or delete the file if that process is not a conversion.")
        os.remove(os.path.join(output_dir, name))
        removed.append(name)
    if removed:
        logging.info("Removed %d temporary file(s) of an interrupted conversion: %s",
                     len(removed), ", ".join(removed))
    return removed


def _check_free_space(output_dir: str, entries: Sequence[Entry]) -> None:
    # A record is the image file's bytes plus its labels and boxes (~100 bytes) and framing.
    need = sum(os.path.getsize(e.path) + 256 for e in entries) + (1 << 20)
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise ConversionError(
            f"The outputs need about {need / 1e6:.1f} MB, but {output_dir} has "
            f"{free / 1e6:.1f} MB free; nothing was written.")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing_outputs(output_dir: str, split: str) -> set[str]:
    pattern = re.compile(rf"{split}(\.tfrecord|-\d{{5}}-of-\d{{5}}\.tfrecord)")
    return {f for f in os.listdir(output_dir) if pattern.fullmatch(f)}


def _feature(tf, value):
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(entry: Entry, tiny_label: dict[str, int],
                 imagenet_label: dict[str, int] | None) -> bytes:
    """Serialized tf.train.Example of one image, with the original converter's features."""
    import tensorflow as tf

    with open(entry.path, "rb") as f:
        encoded = f.read()
    feats = {"image/encoded": encoded, "image/format": _image_format(entry.path).encode()}
    if entry.wnid is not None:
        x1, y1, x2, y2 = entry.box
        feats.update({"bbox/xmin": x1, "bbox/ymin": y1, "bbox/xmax": x2, "bbox/ymax": y2,
                      "label/wnid": entry.wnid.encode(),
                      "label/tiny_imagenet": tiny_label[entry.wnid]})
        if imagenet_label is not None:
            feats["label/imagenet"] = imagenet_label[entry.wnid]
    example = tf.train.Example(features=tf.train.Features(
        feature={k: _feature(tf, v) for k, v in feats.items()}))
    return example.SerializeToString()


def _write_split(split: str, entries: Sequence[Entry], paths: Sequence[str],
                 tiny_label: dict[str, int], imagenet_label: dict[str, int] | None) -> None:
    import tensorflow as tf

    chunks = np.array_split(np.arange(len(entries)), len(paths))
    step, done = max(1000, len(entries) // 10), 0
    for path, idx in zip(paths, chunks, strict=True):
        with tf.io.TFRecordWriter(path) as writer:
            for i in idx:
                writer.write(make_example(entries[i], tiny_label, imagenet_label))
                done += 1
                if done % step == 0 or done == len(entries):
                    logging.info("%s: %d/%d images written.", split, done, len(entries))


def convert(input_dir: str, output_dir: str, synsets_path: str | None = None, seed: int = 0,
            num_shards: int = 1) -> dict[str, list[str]]:
    """Validates ``input_dir`` and writes the TFRecord files; returns {split: output paths}.

    Raises ConversionError (a ValueError) naming what is missing or unreadable; in that case,
    and on any other failure, no file is left under an output name.
    """
    if num_shards < 1:
        raise ConversionError(f"num_shards must be >= 1, got {num_shards}.")
    if not 0 <= seed < 2**32:
        raise ConversionError(f"seed must be in [0, 2**32), got {seed}.")
    wnids, entries = read_annotations(input_dir)
    tiny_label = {w: i for i, w in enumerate(wnids)}
    imagenet_label = None
    if synsets_path:
        synsets = read_wnid_list(synsets_path, "ImageNet synsets file")
        imagenet_label = {w: i + 1 for i, w in enumerate(synsets)}  # 0 is the background class
        missing = [w for w in wnids if w not in imagenet_label]
        _fail(f"wnids.txt has wnids that the synsets file {synsets_path} does not list",
              [f"{w} (line {wnids.index(w) + 1} of wnids.txt)" for w in missing])
    small = {s: len(e) for s, e in entries.items() if len(e) < num_shards}
    if small:
        raise ConversionError(f"num_shards={num_shards} is more than the examples of {small}.")
    logging.info("Found %d classes; %s images.", len(wnids),
                 ", ".join(f"{len(e)} {s}" for s, e in entries.items()))
    check_images([e for split in SPLITS for e in entries[split]])

    order = np.random.RandomState(seed).permutation(len(entries["train"]))
    entries["train"] = [entries["train"][i] for i in order]

    os.makedirs(output_dir, exist_ok=True)
    finals = {s: [os.path.join(output_dir, n) for n in shard_names(s, num_shards)]
              for s in SPLITS}
    stale = sorted(f for s in SPLITS for f in _existing_outputs(output_dir, s)
                   if os.path.join(output_dir, f) not in finals[s])
    if stale:
        raise ConversionError(
            f"{output_dir} already holds {stale[:4]}{' ...' if len(stale) > 4 else ''} from a "
            f"conversion with another --num_shards; a reader would mix both. Delete them or "
            "choose an empty --output_dir.")
    remove_stale_temporaries(output_dir)
    everything = [e for split in SPLITS for e in entries[split]]
    _check_free_space(output_dir, everything)
    import tensorflow as tf

    temps = {s: [_temp_name(p) for p in finals[s]] for s in SPLITS}
    try:
        try:
            for split in SPLITS:
                _write_split(split, entries[split], temps[split], tiny_label, imagenet_label)
            for tmp in (t for s in SPLITS for t in temps[s]):
                _fsync(tmp)  # the data is on disk before any file gets a final name
        except (OSError, tf.errors.OpError) as e:
            raise ConversionWriteError(
                f"Writing {output_dir} failed: {e}. The temporary files were removed and "
                "earlier outputs are untouched.") from e
        # No rename is atomic across files: delete the earlier outputs first, so that a kill
        # between two renames leaves part of this conversion, never a mix of two.
        for final in (f for s in SPLITS for f in finals[s]):
            if os.path.exists(final):
                os.remove(final)
        for split in SPLITS:
            for tmp, final in zip(temps[split], finals[split], strict=True):
                os.replace(tmp, final)
        _fsync(output_dir)
    finally:
        for tmp in (t for s in SPLITS for t in temps[s]):
            if os.path.exists(tmp):
                os.remove(tmp)
    logging.info("All files are converted: %s", ", ".join(
        os.path.basename(p) for s in SPLITS for p in finals[s]))
    return finals


def main(argv: Sequence[str]) -> None:
    """Program entry: reads the flags and runs ``convert``; exits 1 with the reason on bad input."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    missing = [f"--{n}" for n in ("input_dir", "output_dir") if not FLAGS[n].value]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} must be given.")
    try:
        convert(FLAGS.input_dir, FLAGS.output_dir, FLAGS.imagenet_synsets_path or None,
                seed=FLAGS.seed, num_shards=FLAGS.num_shards)
    except ConversionError as e:
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
