"""tools/convert_tiny_imagenet.py: output schema and labels, shuffling, shards, input errors,
no partial outputs, and the program's command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("pandas")

import data_fixtures as fx  # noqa: E402
from absl import app  # noqa: E402
from absl.testing import flagsaver  # noqa: E402

from alp_jax.data import imagenet_tfds_labels, tfrecord_datasets  # noqa: E402

TOOL = fx.CONVERTER


conv = fx.load_converter()


def _records(path):
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _value(example, key):
    f = example.features.feature[key]
    return list(f.bytes_list.value) or list(f.int64_list.value) or list(f.float_list.value)


def _order(path):
    """(wnid, box) of each record: identifies train examples (boxes are random)."""
    return [(_value(e, "label/wnid")[0].decode(), tuple(_value(e, f"bbox/{c}")[0]
                                               for c in ("xmin", "ymin", "xmax", "ymax")))
            for e in _records(path)]


def _outputs(out_dir):
    return sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []


@pytest.fixture
def tree(tmp_path):
    return fx.write_tiny_imagenet_tree(str(tmp_path))


@pytest.fixture
def synsets(tmp_path):
    # TF-slim's imagenet_lsvrc_2015_synsets.txt holds the 1,000 wnids sorted.
    path = tmp_path / "synsets.txt"
    path.write_text("\n".join(imagenet_tfds_labels.SLIM_SORTED_WNIDS) + "\n")
    return str(path)


def test_schema_labels_and_boxes(tree, synsets, tmp_path):
    out = str(tmp_path / "out")
    written = conv.convert(tree, out, synsets, seed=0)
    assert _outputs(out) == ["test.tfrecord", "train.tfrecord", "validation.tfrecord"]
    assert written["train"] == [os.path.join(out, "train.tfrecord")]
    # wnids.txt order, not sorted: the first line (n02124075) is label 0.
    tiny = {w: i for i, w in enumerate(fx.TINY_WNIDS)}
    assert tiny["n02124075"] == 0 and sorted(fx.TINY_WNIDS)[0] != "n02124075"
    imagenet = {"n01443537": 2, "n02124075": 286}  # goldfish, Egyptian cat in TF-slim labels
    train, val, test = (_records(os.path.join(out, f"{s}.tfrecord"))
                        for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (20, 8, 3)
    keys = {"image/encoded", "image/format", "label/wnid", "label/tiny_imagenet",
            "label/imagenet", "bbox/xmin", "bbox/ymin", "bbox/xmax", "bbox/ymax"}
    boxes = {}
    for wnid in fx.TINY_WNIDS:
        with open(os.path.join(tree, "train", wnid, f"{wnid}_boxes.txt")) as f:
            for line in f:
                name, *box = line.split("\t")
                boxes[name] = tuple(int(v) for v in box)
    for e in train + val:
        assert set(e.features.feature) == keys
        (wnid,) = _value(e, "label/wnid")
        wnid = wnid.decode()
        assert _value(e, "label/tiny_imagenet") == [tiny[wnid]]
        assert _value(e, "label/imagenet")[0] == imagenet_tfds_labels.SLIM_SORTED_WNIDS.index(
            wnid) + 1
        if wnid in imagenet:
            assert _value(e, "label/imagenet") == [imagenet[wnid]]
        assert _value(e, "image/format") == [b"jpeg"]
        for c in ("xmin", "ymin", "xmax", "ymax"):
            assert e.features.feature[f"bbox/{c}"].HasField("int64_list")
        decoded = tf.io.decode_jpeg(_value(e, "image/encoded")[0]).numpy()
        assert fx.index_of(decoded.astype("float32") / 127.5 - 1) == tiny[wnid]
    # Train: image bytes and boxes exactly as in the files.
    first = train[0]
    wnid = _value(first, "label/wnid")[0].decode()
    names = [n for n in boxes if n.startswith(wnid)]
    box = tuple(_value(first, f"bbox/{c}")[0] for c in ("xmin", "ymin", "xmax", "ymax"))
    assert box in [boxes[n] for n in names]
    with open(os.path.join(tree, "train", wnid, "images", names[0]), "rb") as f:
        assert _value(first, "image/encoded") == [f.read()]
    # Validation keeps the annotation file's order.
    with open(os.path.join(tree, "val", "val_annotations.txt")) as f:
        val_wnids = [line.split("\t")[1].encode() for line in f]
    assert [_value(e, "label/wnid")[0] for e in val] == val_wnids
    # Test records carry no labels, as in the original.
    for e in test:
        assert set(e.features.feature) == {"image/encoded", "image/format"}


def test_without_synsets_no_imagenet_label(tree, tmp_path):
    out = str(tmp_path / "out")
    conv.convert(tree, out)
    for e in _records(os.path.join(out, "validation.tfrecord")):
        assert "label/imagenet" not in e.features.feature
        assert "label/tiny_imagenet" in e.features.feature


def test_train_shuffle_is_seeded(tree, tmp_path):
    orders = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        conv.convert(tree, str(tmp_path / name), seed=seed)
        orders[name] = _order(str(tmp_path / name / "train.tfrecord"))
    assert orders["a"] == orders["b"]
    assert orders["a"] != orders["c"]
    assert sorted(orders["a"]) == sorted(orders["c"])
    # Shuffled: not grouped by class as read.
    assert [w for w, _ in orders["a"]] != sorted((w for w, _ in orders["a"]),
                                                 key=fx.TINY_WNIDS.index)


def test_shards_split_the_same_order(tree, tmp_path):
    conv.convert(tree, str(tmp_path / "one"), seed=3)
    out = str(tmp_path / "two")
    written = conv.convert(tree, out, seed=3, num_shards=2)
    assert _outputs(out) == [f"{s}-0000{i}-of-00002.tfrecord" for s in
                             ("test", "train", "validation") for i in range(2)]
    assert written["train"] == [os.path.join(out, n) for n in conv.shard_names("train", 2)]
    sharded = sum((_order(p) for p in written["train"]), [])
    assert sharded == _order(str(tmp_path / "one" / "train.tfrecord"))
    assert tfrecord_datasets.split_files("tiny_imagenet", "train", out) == written["train"]
    # A second layout in the same directory would be read twice: refused, nothing written.
    with pytest.raises(conv.ConversionError, match="another --num_shards"):
        conv.convert(tree, out, seed=3, num_shards=1)
    assert "train.tfrecord" not in _outputs(out)
    with pytest.raises(conv.ConversionError, match="num_shards=9 is more than"):
        conv.convert(tree, str(tmp_path / "nine"), num_shards=9)


def _break(tree, how, synsets_path):
    if how == "no_wnids":
        os.remove(os.path.join(tree, "wnids.txt"))
    elif how == "box_names_missing_image":
        os.remove(os.path.join(tree, "train", fx.TINY_WNIDS[1], "images",
                               f"{fx.TINY_WNIDS[1]}_3.JPEG"))
    elif how == "image_does_not_decode":
        path = os.path.join(tree, "val", "images", "val_2.JPEG")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])  # truncated JPEG
    elif how == "wnid_not_in_synsets":
        with open(synsets_path) as f:
            kept = [w for w in f.read().split() if w != fx.TINY_WNIDS[2]]
        with open(synsets_path, "w") as f:
            f.write("\n".join(kept))
    elif how == "no_box_file":
        os.remove(os.path.join(tree, "train", fx.TINY_WNIDS[0], f"{fx.TINY_WNIDS[0]}_boxes.txt"))
    elif how == "val_unknown_wnid":
        with open(os.path.join(tree, "val", "val_annotations.txt"), "a") as f:
            f.write("val_0.JPEG\tn09999999\t1\t2\t3\t4\n")
    elif how == "box_not_integer":
        with open(os.path.join(tree, "val", "val_annotations.txt"), "a") as f:
            f.write(f"val_0.JPEG\t{fx.TINY_WNIDS[0]}\t1\tx\t3\t4\n")
    elif how == "no_test_dir":
        for name in os.listdir(os.path.join(tree, "test", "images")):
            os.remove(os.path.join(tree, "test", "images", name))
        os.rmdir(os.path.join(tree, "test", "images"))


@pytest.mark.parametrize("how, message", [
    ("no_wnids", r"wnids\.txt not found: .*tiny-imagenet-200/wnids\.txt"),
    ("box_names_missing_image", r"_boxes\.txt:4: names image 'n01443537_3\.JPEG', but .* "
                                r"does not exist"),
    ("image_does_not_decode", r"val_2\.JPEG: does not decode"),
    ("wnid_not_in_synsets", r"synsets file .* does not list.*\n  n01629819 \(line 3"),
    ("no_box_file", r"missing annotation file .*n02124075_boxes\.txt"),
    ("val_unknown_wnid", r"val_0\.JPEG has wnid 'n09999999', which wnids\.txt does not list"),
    ("box_not_integer", r"val_annotations\.txt:9: box coordinates are not integers"),
    ("no_test_dir", r"missing directory .*test/images"),
])
def test_bad_input_stops_with_a_clear_error_and_writes_nothing(tree, synsets, tmp_path, how,
                                                                message):
    out = str(tmp_path / "out")
    os.makedirs(out)
    _break(tree, how, synsets)
    with pytest.raises(conv.ConversionError, match=message):
        conv.convert(tree, out, synsets)
    assert _outputs(out) == []


def test_failure_while_writing_leaves_previous_outputs_untouched(tree, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    conv.convert(tree, out, seed=0)
    before = {n: open(os.path.join(out, n), "rb").read() for n in _outputs(out)}
    calls = []
    real = conv.make_example

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:  # during validation.tfrecord, after train was written
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "make_example", failing)
    with pytest.raises(OSError, match="disk full"):
        conv.convert(tree, out, seed=1)
    assert _outputs(out) == sorted(before)  # no temporary files left either
    assert {n: open(os.path.join(out, n), "rb").read() for n in before} == before


def test_main_runs_from_flags(tree, tmp_path):
    out = str(tmp_path / "out")
    with flagsaver.flagsaver():
        conv.FLAGS(["convert_tiny_imagenet.py", f"--input_dir={tree}", f"--output_dir={out}",
                    "--seed=5", "--num_shards=2"], known_only=True)
        conv.main(["convert_tiny_imagenet.py"])
        with pytest.raises(app.UsageError, match="Unexpected arguments: extra"):
            conv.main(["convert_tiny_imagenet.py", "extra"])
    assert "train-00001-of-00002.tfrecord" in _outputs(out)


def test_program_reports_bad_input_and_exits_1(tmp_path):
    # Fails in validation, before TensorFlow is imported, so the subprocess is quick.
    missing = str(tmp_path / "nowhere")
    r = subprocess.run([sys.executable, TOOL, f"--input_dir={missing}",
                        f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert f"--input_dir {missing!r} is not a directory" in r.stderr
    r = subprocess.run([sys.executable, TOOL, f"--input_dir={missing}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "--output_dir must be given" in r.stderr
