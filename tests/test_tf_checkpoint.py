"""TF-slim checkpoint import/export, and parity with TF-slim's ResNet-v2-50 and the original PGD.

The reference is TF-slim itself (``tf_slim.nets.resnet_v2.resnet_v2_50`` under
``resnet_arg_scope()``, TF 2 graph mode) with random weights and non-trivial batch-norm
statistics, saved with TF's own Saver alongside TF's ExponentialMovingAverage shadows, TF's
RMSProp slots and a global step, the way training checkpoints look.

Note on the batch-norm epsilon: our model uses 1.001e-5, the value TF 1.x's
``fused_batch_norm`` clamped slim's 1e-5 to (the release trained with TF 1.8). TF 2.21
no longer clamps (its FusedBatchNormV3 runs with 1e-5), so this parity is against a
slightly different epsilon; with moving variances ~1 the effect is ~1e-9 relative,
far below the tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from alp_jax import checkpoints, pgd, slim_names, tf_checkpoint  # noqa: E402
from alp_jax.losses import softmax_cross_entropy  # noqa: E402
from alp_jax.model import create_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf_reference as ref  # noqa: E402

MODEL = "resnet_v2_50"
IMAGE_SIZE = 64
BATCH = 4
EMA = tf_checkpoint.EMA_SUFFIX
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


class SlimModel:
    """A TF-slim resnet_v2_50 in its own graph and session, saved as a training checkpoint."""

    def __init__(self, num_classes: int, directory: str, global_step: int = 1234):
        tf_, _, _ = ref.load_tf_slim()
        self.num_classes = num_classes
        self.graph = tf_.Graph()
        with self.graph.as_default():
            self.model_fn = ref.slim_model_fn(MODEL, num_classes)
            self.x = tf_.compat.v1.placeholder(tf_.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3])
            self.logits_t = self.model_fn(self.x)
            self.model_vars = tf_.compat.v1.global_variables()
            step_var = tf_.compat.v1.train.get_or_create_global_step()
            # Moving averages of all model variables (BN statistics included), as trained.
            ema = tf_.compat.v1.train.ExponentialMovingAverage(0.9999, num_updates=step_var)
            ema.apply(self.model_vars)
            # TF's own name map for restoring averages into the model, as the original
            # eval did (minus the non-model variables it also lists).
            self.ema_to_restore = {
                k: v for k, v in ema.variables_to_restore(self.model_vars).items()
                if k == f"{v.op.name}/{EMA}"}
            shadows = [ema.average(v) for v in self.model_vars]
            # RMSProp slots (on the fine-tuning scopes, to keep the files small).
            opt = tf_.compat.v1.train.RMSPropOptimizer(0.1, 0.9, 0.9, 1.0)
            tuned = [v for v in tf_.compat.v1.trainable_variables()
                     if v.op.name.startswith((f"{MODEL}/logits", f"{MODEL}/postnorm"))]
            opt.apply_gradients([(tf_.zeros_like(v), v) for v in tuned])
            self.labels = tf_.compat.v1.placeholder(tf_.int32, [None])
            self.objective_t = ref.summed_xent_graph(self.logits_t, self.labels)
            self.niter = tf_.compat.v1.placeholder(tf_.int32, [])
            self.adv_t = {}
            self.sess = tf_.compat.v1.Session(graph=self.graph)
            self.sess.run(tf_.compat.v1.global_variables_initializer())
            shapes = {v.op.name: tuple(v.shape.as_list()) for v in self.model_vars}
            self.values = ref.random_values(shapes, seed=num_classes)
            self.ema_values = {f"{n}/{EMA}": v
                               for n, v in ref.random_values(shapes, seed=num_classes + 1).items()}
            ref.assign(self.sess, [(v, self.values[v.op.name]) for v in self.model_vars]
                       + [(s, self.ema_values[s.op.name]) for s in shadows]
                       + [(step_var, np.int64(global_step))])
            saver = tf_.compat.v1.train.Saver()
            self.prefix = saver.save(self.sess, os.path.join(directory, "model.ckpt"),
                                     global_step=global_step, write_meta_graph=False)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.sess.run(self.logits_t, {self.x: images})

    def objective(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float(self.sess.run(self.objective_t, {self.x: images, self.labels: labels}))

    def attack(self, images: np.ndarray, method: str, niter: int) -> np.ndarray:
        if method not in self.adv_t:
            with self.graph.as_default():
                self.adv_t[method] = ref.pgd_graph(self.x, self.model_fn, method, 16, 2,
                                                   self.niter)
        return self.sess.run(self.adv_t[method], {self.x: images, self.niter: niter})


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    cache: dict[int, SlimModel] = {}

    def get(num_classes: int) -> SlimModel:
        if num_classes not in cache:
            cache[num_classes] = SlimModel(num_classes,
                                           str(tmp_path_factory.mktemp(f"slim{num_classes}")))
        return cache[num_classes]

    yield get
    for m in cache.values():
        m.sess.close()


class Ours:
    """Our model with variables imported from a SlimModel's checkpoint."""

    def __init__(self, slim_model: SlimModel, directory: str):
        self.step_dir, self.result = tf_checkpoint.import_tf_checkpoint(
            slim_model.prefix, directory, dataset_image_size=IMAGE_SIZE)
        self.variables = checkpoints.load_variables(self.step_dir)
        meta = checkpoints.read_meta(self.step_dir)
        self.model = create_model(meta["model_name"], meta["num_classes"])
        self._logits = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
        self._attacks: dict[str, object] = {}

    def logits(self, images: np.ndarray, variables=None) -> np.ndarray:
        return np.asarray(self._logits(variables or self.variables, jnp.asarray(images)))

    def objective(self, images: np.ndarray, labels: np.ndarray) -> float:
        logits = self._logits(self.variables, jnp.asarray(images))
        return float(jnp.sum(softmax_cross_entropy(logits, jnp.asarray(labels))))

    def attack(self, images: np.ndarray, spec: str) -> np.ndarray:
        if spec not in self._attacks:
            model = self.model

            def run(v, x):
                return pgd.generate_adversarial_examples(
                    lambda z: model.apply(v, z, train=False), x, jax.random.PRNGKey(0), spec,
                    bounds=(-1.0, 1.0), random_start=False)

            self._attacks[spec] = jax.jit(run)
        return np.asarray(self._attacks[spec](self.variables, jnp.asarray(images)))


@pytest.fixture(scope="module")
def ours(slim, tmp_path_factory):
    cache: dict[int, Ours] = {}

    def get(num_classes: int) -> Ours:
        if num_classes not in cache:
            cache[num_classes] = Ours(slim(num_classes),
                                      str(tmp_path_factory.mktemp(f"ours{num_classes}")))
        return cache[num_classes]

    return get


# ---- import and logits parity -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [1001, 200])
def test_imported_logits_match_tf_slim(slim, ours, num_classes):
    s, o = slim(num_classes), ours(num_classes)
    assert o.result.model_name == MODEL and o.result.num_classes == num_classes
    assert checkpoints.read_meta(o.step_dir) == {
        "model_name": MODEL, "num_classes": num_classes, "source": "tf",
        "tf_checkpoint": s.prefix, "tf_moving_averages": False,
        "dataset_image_size": IMAGE_SIZE, "tf_global_step": 1234}
    # Every variable is the TF value, bit for bit.
    named = slim_names.variables_to_slim(o.variables)
    assert sorted(named) == sorted(s.values)
    for name, value in s.values.items():
        np.testing.assert_array_equal(named[name], value, err_msg=name)
    images = _images()
    tf_logits, our_logits = s.logits(images), o.logits(images)
    assert tf_logits.shape == our_logits.shape == (BATCH, num_classes)
    scale = np.abs(tf_logits).max()
    assert scale > 1.0 and tf_logits.std() > 0.3, "degenerate reference logits"
    diff = np.abs(tf_logits - our_logits).max()
    assert diff <= 1e-4 * scale, f"max |diff| {diff} vs max |logit| {scale}"


@pytest.mark.slow
def test_import_notes_and_moving_averages(slim, ours, tmp_path):
    s, o = slim(200), ours(200)
    notes = "\n".join(o.result.notes)
    assert "global step (global_step = 1234)" in notes
    assert "optimizer slots (RMSProp: 4, RMSProp_1: 4)" in notes
    assert f"ignored 272 moving averages ('.../{EMA}'); use_moving_averages" in notes
    step_dir, result = tf_checkpoint.import_tf_checkpoint(
        os.path.dirname(s.prefix), str(tmp_path), use_moving_averages=True)
    assert result.moving_averages == 272
    assert checkpoints.read_meta(step_dir)["tf_moving_averages"] is True
    named = slim_names.variables_to_slim(checkpoints.load_variables(step_dir))
    for name in s.values:
        np.testing.assert_array_equal(named[name], s.ema_values[f"{name}/{EMA}"], err_msg=name)


# ---- PGD parity -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "pgdll"])
def test_pgd_one_iteration_matches_tf(slim, ours, method):
    s, o = slim(1001), ours(1001)
    images = _images()
    tf_adv = s.attack(images, method, 1)
    our_adv = o.attack(images, f"{method}_16_2_1")
    agree = np.mean(np.abs(tf_adv - our_adv) <= 1e-6)
    assert agree >= 0.999, f"{method}: only {agree:.5f} of pixels agree after one step"
    assert np.abs(tf_adv - images).max() > 0.0  # the step moved something


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "pgdll"])
def test_pgd_ten_iterations_reach_same_objective(slim, ours, method):
    s, o = slim(1001), ours(1001)
    images = _images()
    tf_adv = s.attack(images, method, 10)
    our_adv = o.attack(images, f"{method}_16_2_10")
    eps = 16 * 2.0 / 255.0
    for adv in (tf_adv, our_adv):
        assert adv.min() >= -1.0 and adv.max() <= 1.0
        assert np.abs(adv - images).max() <= eps + 1e-6
    clean = s.logits(images)
    labels = np.argmax(clean, 1) if method == "pgd" else np.argmin(clean, 1)
    for measure in (s.objective, o.objective):
        start, theirs, mine = (measure(x, labels) for x in (images, tf_adv, our_adv))
        # Both attacks made progress: up for the untargeted one, down for the targeted one.
        sign = 1.0 if method == "pgd" else -1.0
        assert sign * (theirs - start) > 0 and sign * (mine - start) > 0
        assert abs(theirs - mine) <= 0.05 * max(abs(theirs), abs(mine)), (theirs, mine)


# ---- export and round trip --------------------------------------------------------------

def _save_trained(directory: str, variables, ema_variables, step: int) -> str:
    """Our checkpoint with raw values and moving averages, as training writes them."""
    tree = {"step": np.asarray(step, np.int32), "params": variables["params"],
            "batch_stats": variables["batch_stats"], "ema_params": ema_variables["params"],
            "ema_batch_stats": ema_variables["batch_stats"]}
    mngr = checkpoints.manager(directory, async_save=False)
    checkpoints.save(mngr, step, tree, {"model_name": MODEL, "num_classes": 200, "step": step},
                     force=True)
    mngr.wait_until_finished()
    mngr.close()
    return checkpoints.resolve(directory)


@pytest.mark.slow
def test_export_round_trip_and_tf_slim_restore(slim, ours, tmp_path):
    s, o = slim(200), ours(200)
    shapes = {n: v.shape for n, v in s.values.items()}
    raw = slim_names.variables_from_slim(ref.random_values(shapes, seed=7), o.variables)
    avg = slim_names.variables_from_slim(ref.random_values(shapes, seed=8), o.variables)
    ours_dir = _save_trained(str(tmp_path / "trained"), raw, avg, step=55)
    prefix = tf_checkpoint.export_tf_checkpoint(ours_dir, str(tmp_path / "tf" / "model.ckpt"))

    # The TF checkpoint holds exactly the slim names, their moving averages, global_step.
    written = tf_checkpoint.read_tf_checkpoint(str(tmp_path / "tf"))
    raw_named, avg_named = slim_names.variables_to_slim(raw), slim_names.variables_to_slim(avg)
    assert sorted(written) == sorted(
        list(raw_named) + [f"{n}/{EMA}" for n in avg_named] + ["global_step"])
    assert int(written["global_step"]) == 55
    for name, value in raw_named.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
        np.testing.assert_array_equal(written[f"{name}/{EMA}"], avg_named[name], err_msg=name)

    # TF-slim restores it (raw, and through TF's moving-average names) and agrees with us.
    images = _images(seed=3)
    with tf.compat.v1.Session(graph=s.graph) as sess:
        for var_list, variables in ((s.model_vars, raw), (s.ema_to_restore, avg)):
            with s.graph.as_default():
                saver = tf.compat.v1.train.Saver(var_list)
            saver.restore(sess, prefix)
            tf_logits = sess.run(s.logits_t, {s.x: images})
            diff = np.abs(tf_logits - o.logits(images, variables)).max()
            assert diff <= 1e-4 * np.abs(tf_logits).max()

    # And it imports back to the same values.
    for use_ma, expected in ((False, raw_named), (True, avg_named)):
        step_dir, result = tf_checkpoint.import_tf_checkpoint(
            prefix, str(tmp_path / f"back_{use_ma}"), use_moving_averages=use_ma)
        assert result.global_step == 55
        back = slim_names.variables_to_slim(checkpoints.load_variables(step_dir))
        assert sorted(back) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(back[name], value, err_msg=name)


# ---- mapping checks and errors (small model, no TF-slim graph) --------------------------

SMALL = "resnet_v2_small"


def _small_named(num_classes: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    like = tf_checkpoint.model_shapes(SMALL, num_classes)
    shapes = {n: v.shape for n, v in slim_names.variables_to_slim(like).items()}
    return ref.random_values(shapes, seed)


def test_infers_model_and_classes_and_ignores_bookkeeping():
    named = _small_named(10)
    extra = dict(named)
    extra["global_step"] = np.asarray(77, np.int64)
    extra["beta1_power"] = np.asarray(0.9, np.float32)
    w = f"{SMALL}/logits/weights"
    extra[f"{w}/Adam"] = extra[f"{w}/Adam_1"] = named[w]
    extra[f"{w}/Momentum"] = named[w]
    extra[f"{w}/{EMA}"] = named[w] + 1.0  # a partial moving average (fine-tuned scopes)
    result = tf_checkpoint.tf_to_variables(extra)
    assert (result.model_name, result.num_classes, result.global_step) == (SMALL, 10, 77)
    notes = "\n".join(result.notes)
    assert "optimizer slots (Adam: 1, Adam_1: 1, Momentum: 1)" in notes
    assert "beta1_power" in notes and "ignored 1 moving averages" in notes
    got = slim_names.variables_to_slim(result.variables)
    np.testing.assert_array_equal(got[w], named[w])
    result = tf_checkpoint.tf_to_variables(extra, use_moving_averages=True, num_classes=10)
    assert result.moving_averages == 1
    assert any("moving averages of 1 of" in n for n in result.notes)
    got = slim_names.variables_to_slim(result.variables)
    np.testing.assert_array_equal(got[w], named[w] + 1.0)
    b = f"{SMALL}/logits/biases"
    np.testing.assert_array_equal(got[b], named[b])


def test_mismatches_are_one_error_listing_the_names():
    named = _small_named(10)
    del named[f"{SMALL}/postnorm/gamma"]
    named[f"{SMALL}/block9/unit_1/bottleneck_v2/conv1/weights"] = np.zeros((1, 1, 4, 4))
    named[f"{SMALL}/conv1/weights"] = np.zeros((3, 3, 3, 7), np.float32)
    with pytest.raises(ValueError) as info:
        tf_checkpoint.tf_to_variables(named, source="'x.ckpt'")
    msg = str(info.value)
    assert "'x.ckpt' does not match resnet_v2_small with 10 classes" in msg
    assert "1 TF variables map onto no model variable" in msg
    assert f"{SMALL}/block9/unit_1/bottleneck_v2/conv1/weights" in msg
    assert f"missing from the checkpoint:\n  {SMALL}/postnorm/gamma" in msg
    assert f"{SMALL}/conv1/weights: checkpoint (3, 3, 3, 7) vs model (3, 3, 3, 32)" in msg


@pytest.mark.parametrize("change, match", [
    (lambda n: {**n, "vgg_16/fc8/weights": np.zeros(3)}, "several top-level scopes"),
    (lambda n: {k.replace(SMALL, "vgg_16"): v for k, v in n.items()},
     "model scope 'vgg_16', which names no model"),
    (lambda n: {k: v for k, v in n.items() if "/logits/" not in k}, "Cannot infer num_classes"),
    (lambda n: {"global_step": np.int64(1)}, "holds no model variables"),
])
def test_bad_checkpoints_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        tf_checkpoint.tf_to_variables(change(_small_named()))


def test_num_classes_and_moving_average_requests_are_checked():
    named = _small_named(10)
    with pytest.raises(ValueError, match="num_classes=1001 but .* has 10 logits"):
        tf_checkpoint.tf_to_variables(named, num_classes=1001)
    with pytest.raises(ValueError, match="num_classes must be positive, got 0"):
        tf_checkpoint.tf_to_variables(named, num_classes=0)
    with pytest.raises(ValueError, match="has no '.../ExponentialMovingAverage' variables"):
        tf_checkpoint.tf_to_variables(named, use_moving_averages=True)


def test_paths_resolve_and_bad_paths_are_named(tmp_path):
    named = _small_named(10)
    prefix = tf_checkpoint.write_tf_checkpoint(named, str(tmp_path / "a" / "model.ckpt-5"))
    for path in (prefix, prefix + ".index", str(tmp_path / "a")):
        assert tf_checkpoint.resolve_tf_checkpoint(path) == prefix
    os.remove(tmp_path / "a" / "checkpoint")  # no state file: the only *.index prefix
    assert tf_checkpoint.resolve_tf_checkpoint(str(tmp_path / "a")) == prefix
    nested = tf_checkpoint.write_tf_checkpoint(named, str(tmp_path / "tar" / "inner" / "m.ckpt"))
    os.remove(tmp_path / "tar" / "inner" / "checkpoint")  # as unpacked from a tarball
    assert tf_checkpoint.resolve_tf_checkpoint(str(tmp_path / "tar")) == nested
    read = tf_checkpoint.read_tf_checkpoint(prefix)
    assert sorted(read) == sorted(named)
    tf_checkpoint.write_tf_checkpoint(named, str(tmp_path / "a" / "other.ckpt"))
    os.remove(tmp_path / "a" / "checkpoint")
    with pytest.raises(FileNotFoundError, match="several checkpoints"):
        tf_checkpoint.resolve_tf_checkpoint(str(tmp_path / "a"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read TF checkpoint .*notes.txt"):
        tf_checkpoint.read_tf_checkpoint(str(tmp_path / "notes.txt"))
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="No TF checkpoint at .*nope.ckpt"):
        tf_checkpoint.resolve_tf_checkpoint(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No TF checkpoint in directory"):
        tf_checkpoint.resolve_tf_checkpoint(str(tmp_path / "empty"))
    out = str(tmp_path / "out")
    tf_checkpoint.import_tf_checkpoint(prefix, out)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        tf_checkpoint.import_tf_checkpoint(prefix, out)
    with pytest.raises(ValueError, match="is a directory"):
        tf_checkpoint.write_tf_checkpoint(named, str(tmp_path / "a"))


def test_library_imports_without_tensorflow():
    code = ("import sys, alp_jax.tf_checkpoint, alp_jax.checkpoints; "
            "assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_tools_import_and_export(tmp_path):
    named = _small_named(10, seed=4)
    named["global_step"] = np.asarray(9, np.int64)
    named[f"{SMALL}/conv1/weights/RMSProp"] = named[f"{SMALL}/conv1/weights"]
    tf_checkpoint.write_tf_checkpoint(named, str(tmp_path / "tf" / "model.ckpt-9"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    out = str(tmp_path / "jax")
    script = (f"{sys.executable} tools/import_tf_checkpoint.py --checkpoint={tmp_path / 'tf'} "
              f"--output_dir={out} && {sys.executable} tools/export_tf_checkpoint.py "
              f"--checkpoint_path={out} --output={tmp_path / 'back'}/")
    proc = subprocess.run(script, shell=True, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: ignored the global step (global_step = 9)" in proc.stdout
    assert "note: ignored 1 optimizer slots (RMSProp: 1)" in proc.stdout
    assert f"Imported {SMALL} (10 classes)" in proc.stdout
    back = tf_checkpoint.read_tf_checkpoint(str(tmp_path / "back"))
    del named[f"{SMALL}/conv1/weights/RMSProp"]
    named["global_step"] = np.asarray(0, np.int64)  # imported weights are step 0
    assert sorted(back) == sorted(named)
    for name, value in named.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    bad = subprocess.run(
        [sys.executable, "tools/import_tf_checkpoint.py", f"--checkpoint={tmp_path}/nope",
         f"--output_dir={tmp_path}/x"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "No TF checkpoint at" in bad.stderr and "nope" in bad.stderr
