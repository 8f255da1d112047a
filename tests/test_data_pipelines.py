"""TFRecord / TFDS input pipelines on miniature data: batches, preprocessing, labels, resuming,
multi-process sharding, the imagenet_resized label mapping and the errors on bad directories."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import data_fixtures as fx  # noqa: E402

from alp_jax import data  # noqa: E402
from alp_jax.data import imagenet_tfds_labels as tfds_labels  # noqa: E402
from alp_jax.data import tfrecord_datasets as td  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["labels"], y["labels"])
        np.testing.assert_array_equal(x["images"], y["images"])


def _check_batch(b, batch, size):
    assert b["images"].shape == (batch, size, size, 3) and b["images"].dtype == np.float32
    assert b["labels"].shape == (batch,) and b["labels"].dtype == np.int32
    assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The converter's output for a 4-class tree: 20 train and 8 validation records."""
    module = fx.load_converter()
    root = str(tmp_path_factory.mktemp("tiny"))
    module.convert(fx.write_tiny_imagenet_tree(root), os.path.join(root, "out"), seed=0)
    return os.path.join(root, "out")


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """TF-slim shards: train 3 x 4 records (labels 1..12), validation 2 x 5 (labels 1..10)."""
    path = str(tmp_path_factory.mktemp("imagenet"))
    fx.write_imagenet_shards(path, "train", 3, 4, seed=0)
    fx.write_imagenet_shards(path, "validation", 2, 5, seed=1)
    return path


# ------------------------------------------------------------------------------ batches


def test_tiny_train_and_eval_batches(tiny_dir):
    for b in _take(data.train_iterator("tiny_imagenet", tiny_dir, 32, 4, seed=0), 6):
        _check_batch(b, 4, 32)
        assert [fx.index_of(x) for x in b["images"]] == list(b["labels"])
    batches = list(data.eval_iterator("tiny_imagenet", tiny_dir, 64, 3))
    assert len(batches) == 2  # 8 records, the last partial batch dropped
    labels = np.concatenate([b["labels"] for b in batches])
    assert list(labels) == [0, 1, 2, 3, 0, 1]  # val_annotations.txt order
    for b in batches:
        _check_batch(b, 3, 64)
        # Eval preprocessing is a resize only: a flat 64x64 image stays its colour.
        for image, label in zip(b["images"], b["labels"], strict=True):
            expected = np.array(fx.color_of(label)) / 127.5 - 1
            np.testing.assert_allclose(image.mean(axis=(0, 1)), expected, atol=0.03)
    assert data.num_examples("tiny_imagenet", "train", tiny_dir) == 20
    assert data.num_examples("tiny_imagenet", "validation", tiny_dir) == 8
    assert data.num_examples("tiny_imagenet", "train", None) == 100_000


def test_imagenet_train_and_eval_batches(imagenet_dir):
    for b in _take(data.train_iterator("imagenet", imagenet_dir, 24, 5, seed=0), 5):
        _check_batch(b, 5, 24)
        assert [fx.index_of(x) + 1 for x in b["images"]] == list(b["labels"])
        assert set(b["labels"]) <= set(range(1, 13))
    batches = list(data.eval_iterator("imagenet", imagenet_dir, 16, 4))
    assert [list(b["labels"]) for b in batches] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    for b in batches:
        _check_batch(b, 4, 16)
        assert [fx.index_of(x) + 1 for x in b["images"]] == list(b["labels"])
    limited = list(data.eval_iterator("imagenet", imagenet_dir, 16, 3, num_examples=7))
    assert [list(b["labels"]) for b in limited] == [[1, 2, 3], [4, 5, 6]]
    assert data.num_examples("imagenet", "train", imagenet_dir) == 1_281_167
    assert data.num_examples("imagenet", "validation", None) == 50_000


def test_imagenet_eval_is_the_originals_central_crop(tmp_path):
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (60, 80, 3)).astype(np.uint8)
    path = fx.write_records(str(tmp_path / "validation-00000-of-00001"),
                            [fx.slim_example(image, 7, subsampling=0)])
    # Without chroma subsampling a cropped decode equals the full decode's slice.
    decoded = tf.io.decode_jpeg(fx.jpeg_bytes(image, subsampling=0)).numpy().astype(np.float32)
    # crop = int(0.875 * 60) = 52, offsets ((60 - 52 + 1) // 2, (80 - 52 + 1) // 2) = (4, 14);
    # resizing to the crop's own size is the identity.
    (b,) = list(data.eval_iterator("imagenet", os.path.dirname(path), 52, 1))
    expected = np.clip(decoded[4:56, 14:66] / 255.0 * 2 - 1, -1, 1)
    np.testing.assert_allclose(b["images"][0], expected, atol=2.5 / 255)
    assert b["labels"].tolist() == [7]


def test_resize_is_tf1_bicubic_with_legacy_pixel_centres():
    # With half_pixel_centers=False output pixel 2i samples input pixel i exactly; TF2's
    # default (half-pixel centres) would shift it by a quarter pixel.
    image = np.random.RandomState(0).uniform(size=(5, 5, 3)).astype(np.float32)
    out = td._resize(tf.constant(image), 10).numpy()
    np.testing.assert_allclose(out[::2, ::2], image, atol=1e-5)
    modern = tf.image.resize(image, (10, 10), method="bicubic").numpy()
    assert np.abs(modern[::2, ::2] - image).max() > 1e-2


def _flip_counts(dataset, path, n):
    flipped = kept = 0
    for b in _take(data.train_iterator(dataset, path, 32, 16, seed=0), n):
        for image in b["images"]:
            left, right = image[:, 0].mean(), image[:, -1].mean()
            flipped += left > right + 1.0
            kept += right > left + 1.0
    return flipped, kept


def test_imagenet_train_flips_tiny_imagenet_does_not(tmp_path):
    image = fx.dark_left_image(64, 64)
    fx.write_records(str(tmp_path / "imagenet" / "train-00000-of-00001"),
                     [fx.slim_example(image, 1)])
    fx.write_records(str(tmp_path / "tiny" / "train.tfrecord"), [fx.tiny_example(image, 0)])
    flipped, kept = _flip_counts("imagenet", str(tmp_path / "imagenet"), 4)
    assert flipped >= 8 and kept >= 8, (flipped, kept)
    # Tiny crops cover >= half the image, so both halves always show; never mirrored.
    flipped, kept = _flip_counts("tiny_imagenet", str(tmp_path / "tiny"), 2)
    assert (flipped, kept) == (0, 32)


def test_train_crops_vary_and_are_seeded(imagenet_dir, tmp_path):
    rng = np.random.RandomState(1)
    image = rng.randint(0, 256, (80, 100, 3)).astype(np.uint8)
    fx.write_records(str(tmp_path / "train-00000-of-00001"),
                     [fx.slim_example(image, 3, [[0.2, 0.2, 0.8, 0.9]])])
    a = _take(data.train_iterator("imagenet", str(tmp_path), 32, 4, seed=0), 2)
    b = _take(data.train_iterator("imagenet", str(tmp_path), 32, 4, seed=0), 2)
    c = _take(data.train_iterator("imagenet", str(tmp_path), 32, 4, seed=1), 2)
    _same(a, b)
    assert not np.allclose(a[0]["images"], c[0]["images"])
    views = np.concatenate([x["images"] for x in a])
    assert len({v.tobytes() for v in views}) == len(views)  # every step a new crop


# ------------------------------------------------------------------ resuming and processes


@pytest.mark.parametrize("dataset, process_count, batch", [
    ("tiny_imagenet", 1, 3),   # one file, epochs of 20 records
    ("tiny_imagenet", 2, 3),   # one file, two processes: every other record each
    ("imagenet", 2, 3),        # three files: process 0 reads two, process 1 one
])
def test_resuming_at_step_k_gives_batches_k_onwards(tiny_dir, imagenet_dir, dataset,
                                                    process_count, batch):
    path = tiny_dir if dataset == "tiny_imagenet" else imagenet_dir
    for p in range(process_count):
        kw = dict(seed=4, process_index=p, process_count=process_count)
        fresh = _take(data.train_iterator(dataset, path, 16, batch, **kw), 12)
        for k in (5, 7, 9):  # mid-epoch, across one and several epoch boundaries
            resumed = _take(data.train_iterator(dataset, path, 16, batch, start_step=k, **kw),
                            12 - k)
            _same(resumed, fresh[k:])
        other = _take(data.train_iterator(dataset, path, 16, batch, seed=5, process_index=p,
                                          process_count=process_count), 12)
        assert any(not np.array_equal(x["labels"], y["labels"])
                   for x, y in zip(fresh, other, strict=True))


@pytest.mark.parametrize("process_count, shares", [
    (2, [8, 4]),        # 3 files: process 0 reads files 0 and 2, process 1 file 1
    (3, [4, 4, 4]),     # a file each
    (4, [3, 3, 3, 3]),  # fewer files than processes: every 4th record of one shared order
])
def test_training_processes_read_disjoint_parts_that_cover_the_data(imagenet_dir,
                                                                    process_count, shares):
    epochs = [[], []]
    for p, n in enumerate(shares):
        it = data.train_iterator("imagenet", imagenet_dir, 8, 1, seed=0, process_index=p,
                                 process_count=process_count)
        labels = [int(b["labels"][0]) for b in _take(it, 2 * n)]
        for e in range(2):
            epoch = labels[e * n:(e + 1) * n]
            assert len(set(epoch)) == n  # an epoch is a permutation of this process's part
            epochs[e] += epoch
        if process_count <= 3:  # reading by file: the same part every epoch
            assert sorted(labels[:n]) == sorted(labels[n:])
    for epoch in epochs:  # together, each epoch covers every record exactly once
        assert sorted(epoch) == list(range(1, 13))


@pytest.mark.parametrize("process_count, local, num_examples", [(2, 2, -1), (2, 1, 7), (3, 1, -1)])
def test_eval_processes_split_each_global_batch(imagenet_dir, process_count, local,
                                                num_examples):
    single = list(data.eval_iterator("imagenet", imagenet_dir, 16, local * process_count,
                                     num_examples=num_examples))
    per_process = [list(data.eval_iterator("imagenet", imagenet_dir, 16, local,
                                           num_examples=num_examples, process_index=p,
                                           process_count=process_count))
                   for p in range(process_count)]
    n = 10 if num_examples < 0 else num_examples
    assert len(single) == n // (local * process_count) > 0
    for j, whole in enumerate(single):
        parts = [batches[j] for batches in per_process]
        np.testing.assert_array_equal(np.concatenate([b["labels"] for b in parts]),
                                      whole["labels"])
        np.testing.assert_array_equal(np.concatenate([b["images"] for b in parts]),
                                      whole["images"])
    assert all(len(batches) == len(single) for batches in per_process)


# --------------------------------------------------------------------------------- errors


def test_bad_directories_and_arguments(tmp_path, tiny_dir, imagenet_dir):
    with pytest.raises(ValueError, match=r"needs a data directory \(--imagenet_data_dir\)"):
        data.train_iterator("imagenet", None, 32, 4)
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"does not exist: {missing}"):
        data.eval_iterator("tiny_imagenet", missing, 32, 4)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(FileNotFoundError, match=rf"'train\*\.tfrecord' in {empty}"):
        data.train_iterator("tiny_imagenet", empty, 32, 4)
    with pytest.raises(FileNotFoundError, match=rf"'validation-\*' in {empty}"):
        data.eval_iterator("imagenet", empty, 32, 4)
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        data.eval_iterator("imagenet", imagenet_dir, 32, 4, split="test")
    with pytest.raises(ValueError, match="process_index must be in"):
        data.train_iterator("imagenet", imagenet_dir, 32, 4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        data.train_iterator("imagenet", imagenet_dir, 32, 4, start_step=-1)
    # Nothing to read would make the endless training stream spin: refused up front.
    (tmp_path / "empty" / "train-00000-of-00001").write_bytes(b"")
    with pytest.raises(ValueError, match="reads only empty files"):
        data.train_iterator("imagenet", empty, 32, 4)
    with pytest.raises(ValueError, match="20 training records .* cannot be shared by 21"):
        data.train_iterator("tiny_imagenet", tiny_dir, 32, 1, process_index=0,
                            process_count=21)


def test_incomplete_or_mixed_shard_sets(tmp_path, imagenet_dir, tiny_dir):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train-00000-of-00003", "train-00002-of-00003"):
        (partial / name).write_bytes(open(os.path.join(imagenet_dir, name), "rb").read())
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards are missing "
                                                r"\(e\.g\. train-00001-of-00003\)"):
        data.train_iterator("imagenet", str(partial), 32, 4)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    train = open(os.path.join(tiny_dir, "train.tfrecord"), "rb").read()
    (mixed / "train.tfrecord").write_bytes(train)
    (mixed / "train-00000-of-00001.tfrecord").write_bytes(train)
    with pytest.raises(ValueError, match="mixes sharded files"):
        data.train_iterator("tiny_imagenet", str(mixed), 32, 4)


def test_records_without_labels_fail_loudly(tmp_path, tiny_dir):
    # test.tfrecord has no label/tiny_imagenet; read as training data it must not yield -1.
    (tmp_path / "train.tfrecord").write_bytes(
        open(os.path.join(tiny_dir, "test.tfrecord"), "rb").read())
    with pytest.raises(tf.errors.InvalidArgumentError, match="label/tiny_imagenet outside"):
        next(data.train_iterator("tiny_imagenet", str(tmp_path), 32, 2))


def test_count_records(tiny_dir, tmp_path):
    path = os.path.join(tiny_dir, "train.tfrecord")
    assert td.count_records(path) == sum(1 for _ in tf.data.TFRecordDataset(path)) == 20
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(open(path, "rb").read()[:-10])
    with pytest.raises(ValueError, match="truncated or not a TFRecord file"):
        td.count_records(str(cut))


# ------------------------------------------------------------------- imagenet_resized (TFDS)


def test_imagenet_resized_label_table_matches_tf_slim_convention():
    wnids, slim = tfds_labels.IMAGENET_RESIZED_WNIDS, tfds_labels.SLIM_SORTED_WNIDS
    table = tfds_labels.imagenet_resized_to_slim()
    assert len(set(wnids)) == 1000 and list(slim) == sorted(wnids)
    assert sorted(table.tolist()) == list(range(1, 1001))
    # Known TF-slim labels (1001-class, background 0): tench 1, goldfish 2, kit fox 279.
    assert slim[0] == "n01440764" and slim[1] == "n01443537"
    assert wnids[0] == "n02119789" and table[0] == 279
    for i, wnid in enumerate(wnids):
        assert slim[table[i] - 1] == wnid


def test_label_lists_match_the_installed_tfds_files():
    tfds = pytest.importorskip("tensorflow_datasets")
    root = os.path.dirname(tfds.__file__)

    def read(*parts):
        with open(os.path.join(root, *parts)) as f:
            return tuple(line.strip() for line in f if line.strip())

    assert read("image_classification", "imagenet_resized_labels.txt") == \
        tfds_labels.IMAGENET_RESIZED_WNIDS
    # TFDS imagenet2012 numbers classes in sorted-wnid order, the TF-slim order minus one.
    assert read("datasets", "imagenet2012", "labels.txt") == tfds_labels.SLIM_SORTED_WNIDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    path = str(tmp_path_factory.mktemp("tfds"))
    fx.write_imagenet_resized(path, {"train": [0, 1, 2, 3, 4, 5, 6, 999],
                                     "validation": [999, 0, 5, 6, 1]})
    return path


def test_imagenet_resized_pipeline_maps_labels_to_tf_slim(tfds_dir):
    table = tfds_labels.imagenet_resized_to_slim()
    train_labels = [0, 1, 2, 3, 4, 5, 6, 999]
    for b in _take(data.train_iterator("imagenet_tfds", tfds_dir, 32, 4, seed=0), 4):
        _check_batch(b, 4, 32)
        assert [table[train_labels[fx.index_of(x)]] for x in b["images"]] == list(b["labels"])
    (b,) = list(data.eval_iterator("imagenet_tfds", tfds_dir, 64, 4))
    assert list(b["labels"]) == [table[999], 279, table[5], table[6]]
    assert [fx.index_of(x) for x in b["images"]] == [0, 1, 2, 3]
    assert data.num_examples("imagenet_tfds", "validation", tfds_dir) == 5
    # The prepared version directory itself works as data_dir too.
    version_dir = os.path.join(tfds_dir, "imagenet_resized", "64x64")
    version_dir = os.path.join(version_dir, os.listdir(version_dir)[0])
    (b2,) = list(data.eval_iterator("imagenet_tfds", version_dir, 64, 4))
    np.testing.assert_array_equal(b2["labels"], b["labels"])


def test_imagenet_resized_missing_preparation(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match=r"No prepared TFDS imagenet_resized/64x64 in "
                                                rf"{tmp_path}: expected .*dataset_info\.json"):
        data.eval_iterator("imagenet_tfds", str(tmp_path), 64, 4)


# ------------------------------------------------------------------------- no TensorFlow


def test_module_imports_and_sizes_without_tensorflow():
    script = (
        "import sys\n"
        "sys.modules['tensorflow'] = None\n"
        "sys.modules['tensorflow_datasets'] = None\n"
        "from alp_jax.data import tfrecord_datasets as td\n"
        "print(td.num_examples('imagenet', 'train'), td.num_examples('tiny_imagenet', "
        "'validation'))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1281167", "10000"]
