"""ResNet-v2 (alp_jax.model) and its TF-slim names (alp_jax.slim_names).

ResNet-v2-50/101 are only ever traced with ``jax.eval_shape`` (no real initialisation);
real computations use the small model.
"""

from __future__ import annotations

import math
import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alp_jax import model as model_lib
from alp_jax import slim_names
from alp_jax.model import BatchNorm, Conv, create_model, resnet_v2_50, resnet_v2_101

R50 = "resnet_v2_50"


def _shapes(model, image_size=64):
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def r50_shapes():
    return _shapes(resnet_v2_50(1001))


@pytest.fixture(scope="module")
def r50_names(r50_shapes):
    flat = {}
    for col in slim_names.COLLECTIONS:
        for name, leaf in zip(slim_names.tree_paths(r50_shapes[col]),
                              jax.tree_util.tree_leaves(r50_shapes[col]), strict=True):
            flat[name] = (col, tuple(leaf.shape))
    return flat


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# ---- ResNet-v2-50 structure and names ---------------------------------------------------

def test_resnet_v2_50_parameter_counts(r50_shapes):
    assert set(r50_shapes) == {"params", "batch_stats"}
    assert _count(r50_shapes["params"]) == 25_570_409
    assert len(jax.tree_util.tree_leaves(r50_shapes)) == 272
    assert _count(r50_shapes) == 25_615_849
    # Parameters and statistics are float32 whatever the compute dtype.
    assert {x.dtype for x in jax.tree_util.tree_leaves(r50_shapes)} == {jnp.dtype("float32")}


def test_resnet_v2_50_slim_names(r50_names):
    assert len(r50_names) == 272  # unique across both collections
    unit = f"{R50}/block1/unit_1/bottleneck_v2"
    expected = {
        f"{R50}/conv1/weights": ("params", (7, 7, 3, 64)),
        f"{R50}/conv1/biases": ("params", (64,)),
        f"{unit}/preact/gamma": ("params", (64,)),
        f"{unit}/preact/moving_variance": ("batch_stats", (64,)),
        f"{unit}/conv1/weights": ("params", (1, 1, 64, 64)),
        f"{unit}/conv1/BatchNorm/gamma": ("params", (64,)),
        f"{unit}/conv1/BatchNorm/beta": ("params", (64,)),
        f"{unit}/conv1/BatchNorm/moving_mean": ("batch_stats", (64,)),
        f"{unit}/conv2/weights": ("params", (3, 3, 64, 64)),
        f"{unit}/conv3/weights": ("params", (1, 1, 64, 256)),
        f"{unit}/conv3/biases": ("params", (256,)),
        # unit_1 changes the depth (64 -> 256): a 1x1 conv shortcut with bias.
        f"{unit}/shortcut/weights": ("params", (1, 1, 64, 256)),
        f"{unit}/shortcut/biases": ("params", (256,)),
        f"{R50}/block4/unit_3/bottleneck_v2/conv2/weights": ("params", (3, 3, 512, 512)),
        f"{R50}/postnorm/gamma": ("params", (2048,)),
        f"{R50}/postnorm/moving_variance": ("batch_stats", (2048,)),
        f"{R50}/logits/weights": ("params", (1, 1, 2048, 1001)),
        f"{R50}/logits/biases": ("params", (1001,)),
    }
    for name, want in expected.items():
        assert r50_names.get(name) == want, name
    # Same depth in and out: the shortcut is the (subsampled) input, no variables.
    assert not any(n.startswith(f"{R50}/block1/unit_2/bottleneck_v2/shortcut")
                   for n in r50_names)
    shortcuts = sorted({n.split("/bottleneck_v2")[0] for n in r50_names if "/shortcut/" in n})
    assert shortcuts == [f"{R50}/block{b}/unit_1" for b in range(1, 5)]
    # Convs followed by BatchNorm have no bias; the others have no BatchNorm.
    assert not any(re.search(r"/conv[12]/biases$", n) and "block" in n for n in r50_names)
    assert not any(re.search(r"/(conv3|shortcut|logits)/BatchNorm/", n) for n in r50_names)
    units = {re.match(rf"{R50}/(block\d/unit_\d+)/", n).group(1) for n in r50_names
             if "/unit_" in n}
    assert len(units) == 3 + 4 + 6 + 3
    leaves = {n.rsplit("/", 1)[1] for n in r50_names}
    assert leaves == {"weights", "biases", "gamma", "beta", "moving_mean", "moving_variance"}
    for name, (col, _) in r50_names.items():
        assert (col == "batch_stats") == name.endswith(("moving_mean", "moving_variance"))


@pytest.mark.parametrize("size,feature", [(64, 2), (32, 1)])
def test_resnet_v2_50_output_shapes(r50_shapes, size, feature):
    model = resnet_v2_50(1001)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True), r50_shapes, x)
    assert logits.shape == (3, 1001) and logits.dtype == jnp.float32
    # Root stride 2 and pool stride 2, then blocks 1-3 stride 2: 64x64 ends at 2x2.
    postnorm = state["intermediates"][R50]["postnorm"]["__call__"][0]
    assert postnorm.shape == (3, feature, feature, 2048)
    inter = state["intermediates"][R50]
    assert inter["conv1"]["__call__"][0].shape[1:3] == (size // 2,) * 2
    # The stride sits on the LAST unit of blocks 1-3: (block, unit) -> spatial size.
    pooled = size // 4
    for b, units in enumerate((3, 4, 6, 3), start=1):
        for u in range(1, units + 1):
            out = inter[f"block{b}"][f"unit_{u}"]["__call__"][0]
            shrink = 2 ** (b - 1 + (u == units and b < 4))
            assert out.shape[1:] == (pooled // shrink, pooled // shrink, 256 * 2 ** (b - 1)), (
                b, u)


@pytest.mark.parametrize("size", [32, 16])
def test_small_model_output_shapes(small_variables, size):
    model = helpers.small_model()
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        small_variables, jnp.ones((2, size, size, 3)))
    assert logits.shape == (2, helpers.NUM_CLASSES) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_create_model_by_name():
    m = create_model("resnet_v2_101", 200, dtype="bfloat16", bn_group_size=8)
    assert m.scope_name == "resnet_v2_101" and m.num_classes == 200
    assert m.dtype == jnp.bfloat16 and m.bn_group_size == 8
    assert [b.num_units for b in m.blocks] == [3, 4, 23, 3]
    assert [b.stride for b in m.blocks] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="resnet_v2_51"):
        create_model("resnet_v2_51", 10)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["im2col", "auto"])
def test_conv_impl_changes_lowering_not_parameters_or_results(small_variables, impl):
    """im2col convolutions (the CPU default of the programs) train the same model."""
    ref, other = helpers.small_model(), helpers.small_model(conv_impl=impl)
    x = jnp.asarray(helpers.digits_split("validation")[0][:8])
    init = jax.eval_shape(lambda k: other.init(k, x, train=False), jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(small_variables)
    for train in (False, True):
        def run(model, v, train=train):
            if train:
                return model.apply(v, x, train=True, mutable=["batch_stats"])[0]
            return model.apply(v, x, train=False)

        np.testing.assert_allclose(jax.jit(lambda v, m=other: run(m, v))(small_variables),
                                   jax.jit(lambda v, m=ref: run(m, v))(small_variables),
                                   rtol=1e-4, atol=1e-5)

    def grads(model):
        def loss(p):
            v = {"params": p, "batch_stats": small_variables["batch_stats"]}
            logits = model.apply(v, x, train=True, mutable=["batch_stats"])[0]
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
        return jax.jit(jax.grad(loss))(small_variables["params"])

    g_ref, g_other = grads(ref), grads(other)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_ref))
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_other),
                    strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale
    with pytest.raises(ValueError, match="conv_impl 'cudnn'.*auto, xla, im2col"):
        create_model("resnet_v2_small", 10, conv_impl="cudnn")


# ---- BatchNorm --------------------------------------------------------------------------

def test_batchnorm_constants():
    assert model_lib.BN_DECAY == 0.997
    # slim asks for 1e-5; TF's fused kernel raises it to 1.001e-5 (see model.py).
    assert model_lib.BN_EPSILON == pytest.approx(1.001e-5, rel=1e-9)
    assert BatchNorm().decay == 0.997 and resnet_v2_50(1001).bn_decay == 0.997


def _bn_numpy(x, gamma, beta, mean, var, eps=model_lib.BN_EPSILON, relu=True):
    y = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return np.maximum(y, 0) if relu else y


@pytest.mark.parametrize("activation", [True, False])
def test_batchnorm_train_mode_uses_batch_stats_and_updates_moving_stats(activation):
    rng = np.random.RandomState(0)
    x = rng.normal(2.0, 3.0, (6, 3, 5, 4)).astype(np.float32)
    gamma = rng.uniform(0.5, 2, 4).astype(np.float32)
    beta = rng.normal(size=4).astype(np.float32)
    mm = rng.normal(size=4).astype(np.float32)
    mv = rng.uniform(0.5, 2, 4).astype(np.float32)
    bn = BatchNorm(activation=activation)
    variables = {"params": {"gamma": gamma, "beta": beta},
                 "batch_stats": {"moving_mean": mm, "moving_variance": mv}}
    y, upd = jax.jit(lambda v, x: bn.apply(v, x, True, mutable=["batch_stats"]))(variables, x)
    mean = x.astype(np.float64).mean((0, 1, 2))
    var = x.astype(np.float64).var((0, 1, 2))  # biased: what the output is normalised with
    np.testing.assert_allclose(y, _bn_numpy(x, gamma, beta, mean, var, relu=activation),
                               rtol=1e-4, atol=1e-4)
    n = 6 * 3 * 5
    d = model_lib.BN_DECAY
    np.testing.assert_allclose(upd["batch_stats"]["moving_mean"], d * mm + (1 - d) * mean,
                               rtol=1e-5, atol=1e-6)
    # TF's fused kernel feeds the Bessel-corrected variance into the moving average.
    np.testing.assert_allclose(upd["batch_stats"]["moving_variance"],
                               d * mv + (1 - d) * var * n / (n - 1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(upd["batch_stats"]["moving_variance"], d * mv + (1 - d) * var,
                           rtol=1e-7, atol=0)

    # Inference: the moving statistics, no update, and each example on its own.
    y_inf = jax.jit(lambda v, x: bn.apply(v, x, False))(variables, x)
    np.testing.assert_allclose(y_inf, _bn_numpy(x, gamma, beta, mm, mv, relu=activation),
                               rtol=1e-4, atol=1e-4)
    y_one = jax.jit(lambda v, x: bn.apply(v, x, False))(variables, x[2:3])
    np.testing.assert_allclose(y_one, y_inf[2:3], rtol=1e-6, atol=1e-6)


def test_batchnorm_group_size():
    rng = np.random.RandomState(1)
    x = rng.normal(size=(8, 2, 2, 3)).astype(np.float32) + np.arange(8)[:, None, None, None]
    init = {"params": {"gamma": np.ones(3, np.float32), "beta": np.zeros(3, np.float32)},
            "batch_stats": {"moving_mean": np.zeros(3, np.float32),
                            "moving_variance": np.ones(3, np.float32)}}

    def run(group, x):
        return BatchNorm(group_size=group, activation=False).apply(
            init, x, True, mutable=["batch_stats"])

    y, upd = run(4, x)
    halves = [run(0, x[:4]), run(0, x[4:])]
    np.testing.assert_allclose(y, np.concatenate([h[0] for h in halves]), rtol=1e-5, atol=1e-5)
    for k in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            upd["batch_stats"][k], (halves[0][1]["batch_stats"][k]
                                    + halves[1][1]["batch_stats"][k]) / 2, rtol=1e-5)
    y_global, _ = run(0, x)
    assert not np.allclose(y, y_global, atol=1e-3)
    np.testing.assert_allclose(run(8, x)[0], y_global)  # a group of the whole batch
    np.testing.assert_allclose(run(16, x)[0], y_global)  # larger than the batch: global
    with pytest.raises(ValueError, match="group_size 3"):
        run(3, x)


def test_model_train_vs_inference_batchnorm(small_variables):
    model = helpers.small_model()
    x = jnp.asarray(helpers.digits_split("validation")[0][:8])
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))

    @jax.jit
    def train(v, x):  # logits, and the new batch_stats with every module's output
        return model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=True)

    # Inference: an example's logits do not depend on the rest of the batch.
    full = infer(small_variables, x)
    np.testing.assert_allclose(infer(small_variables, x[:1])[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(infer(small_variables, x[::-1])[::-1], full, rtol=1e-5, atol=1e-5)
    # Training: batch statistics, so the rest of the batch matters; moving stats move.
    logits, state = train(small_variables, x)
    upd = {"batch_stats": state["batch_stats"]}
    other, _ = train(small_variables, jnp.concatenate([x[:4], -x[4:]]))
    assert not np.allclose(logits[:4], other[:4], atol=1e-4)
    assert not np.allclose(logits, full, atol=1e-4)
    shifted = {"params": small_variables["params"], "batch_stats": jax.tree_util.tree_map(
        lambda s: s + 0.5, small_variables["batch_stats"])}
    np.testing.assert_array_equal(train(shifted, x)[0], logits)  # moving stats unused
    assert not np.allclose(infer(shifted, x), full, atol=1e-4)  # ... but used here
    assert set(state) == {"batch_stats", "intermediates"}  # params are not mutated
    old = slim_names.variables_to_slim({"batch_stats": small_variables["batch_stats"]})
    new = slim_names.variables_to_slim(upd)
    # Two statistics per BatchNorm: preact, conv1 and conv2 of 4 units, and postnorm.
    assert old.keys() == new.keys() and len(new) == 2 * (3 * 4 + 1)
    for name in new:
        assert not np.allclose(old[name], new[name]), name
    # postnorm's update from its input (block4's output): Bessel-corrected variance.
    h = np.asarray(state["intermediates"][helpers.SMALL_SCOPE]["block4"]["__call__"][0],
                   np.float64)
    n = h.shape[0] * h.shape[1] * h.shape[2]
    d = helpers.BN_DECAY
    post = f"{helpers.SMALL_SCOPE}/postnorm"
    np.testing.assert_allclose(new[f"{post}/moving_mean"],
                               d * old[f"{post}/moving_mean"] + (1 - d) * h.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        new[f"{post}/moving_variance"],
        d * old[f"{post}/moving_variance"] + (1 - d) * h.var((0, 1, 2)) * n / (n - 1),
        rtol=1e-4, atol=1e-5)


def test_model_bn_group_size_splits_the_batch(small_variables):
    x = jnp.asarray(helpers.digits_split("validation")[0][:8])

    def train(model):
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))

    grouped, upd = train(helpers.small_model(bn_group_size=4))(small_variables, x)
    plain = train(helpers.small_model())
    (a, ua), (b, ub) = plain(small_variables, x[:4]), plain(small_variables, x[4:])
    np.testing.assert_allclose(grouped, np.concatenate([a, b]), rtol=1e-4, atol=1e-4)
    avg = jax.tree_util.tree_map(lambda p, q: (p + q) / 2, ua, ub)
    assert helpers.tree_allclose(upd, avg, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute(small_variables, trained_digits):
    shapes = _shapes(helpers.small_model(dtype=jnp.bfloat16), 16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
        small_variables)
    bf16 = helpers.small_model(dtype=jnp.bfloat16)
    x = trained_digits.val_images[:64]
    v = trained_digits.variables
    lo, state = jax.jit(lambda v, x: bf16.apply(v, x, train=False, capture_intermediates=True))(
        v, x)
    hi = trained_digits.logits(v, x)
    assert lo.dtype == jnp.float32
    # The computation itself runs in bfloat16 (activations), not just the output.
    inter = state["intermediates"][helpers.SMALL_SCOPE]
    for name in ("conv1", "block1", "block4", "postnorm"):
        assert inter[name]["__call__"][0].dtype == jnp.bfloat16, name
    assert not np.array_equal(lo, hi)
    scale = float(np.max(np.abs(hi)))
    np.testing.assert_allclose(lo, hi, atol=0.05 * scale)
    assert np.mean(np.argmax(lo, -1) == np.argmax(hi, -1)) >= 0.95
    # Training mode: statistics stay float32.
    _, upd = jax.jit(lambda v, x: bf16.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert {a.dtype for a in jax.tree_util.tree_leaves(upd)} == {jnp.dtype("float32")}


# ---- conv2d_same ------------------------------------------------------------------------

def _conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("k", [3, 7])
def test_conv2d_same_padding(k):
    rng = np.random.RandomState(k)
    conv = Conv(5, k, stride=2, conv2d_same=True)
    w = rng.normal(size=(k, k, 3, 5)).astype(np.float32)
    variables = {"params": {"weights": w}}
    apply = jax.jit(lambda v, x: conv.apply(v, x, False))
    before, after = (k - 1) // 2, (k - 1) - (k - 1) // 2
    for size in (8, 9):
        x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
        y = apply(variables, x)
        explicit = _conv(np.pad(x, ((0, 0), (before, after), (before, after), (0, 0))), w, 2,
                         "VALID")
        same = _conv(x, w, 2, "SAME")
        assert y.shape == same.shape == (2, (size + 1) // 2, (size + 1) // 2, 5)
        np.testing.assert_allclose(y, explicit, rtol=1e-5, atol=1e-4)
        if size % 2 == 0:  # SAME pads (k-1)//2 - 1 before for even sizes: shifted windows
            assert not np.allclose(y, same, atol=1e-2)
        else:  # odd sizes: SAME pads the same way
            np.testing.assert_allclose(y, same, rtol=1e-5, atol=1e-4)
    # Stride 1: plain SAME.
    x = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
    y1 = Conv(5, k, stride=1, conv2d_same=True).apply(variables, x, False)
    np.testing.assert_allclose(y1, _conv(x, w, 1, "SAME"), rtol=1e-5, atol=1e-4)


# ---- slim names: round trip, errors, scopes ---------------------------------------------

def test_slim_names_round_trip(trained_digits):
    variables = trained_digits.variables
    named = slim_names.variables_to_slim(variables)
    n_leaves = len(jax.tree_util.tree_leaves(variables))
    assert len(named) == n_leaves
    assert sorted(named) == slim_names.slim_names(variables)
    assert all(n.startswith(helpers.SMALL_SCOPE + "/") for n in named)
    back = slim_names.variables_from_slim(named, variables)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables),
                    strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    # Values land under their own names (not merely the same multiset of arrays).
    bumped = dict(named)
    key = f"{helpers.SMALL_SCOPE}/block2/unit_1/bottleneck_v2/conv2/BatchNorm/moving_mean"
    bumped[key] = named[key] + 1.0
    back = slim_names.variables_from_slim(bumped, variables)
    got = slim_names.variables_to_slim(back)
    np.testing.assert_array_equal(got[key], named[key] + 1.0)
    assert all(np.array_equal(got[n], named[n]) for n in named if n != key)
    # map_with_names sees the same names.
    seen = slim_names.map_with_names(lambda name, x: name, variables["params"])
    assert sorted(jax.tree_util.tree_leaves(seen)) == sorted(
        slim_names.tree_paths(variables["params"]))


def test_slim_names_errors(small_variables):
    named = slim_names.variables_to_slim(small_variables)
    logits_w = f"{helpers.SMALL_SCOPE}/logits/weights"
    post_var = f"{helpers.SMALL_SCOPE}/postnorm/moving_variance"

    missing = {k: v for k, v in named.items() if k != post_var}
    with pytest.raises(ValueError, match="missing") as e:
        slim_names.variables_from_slim(missing, small_variables)
    assert post_var in str(e.value)
    # Not strict: the missing variable keeps the model's value.
    out = slim_names.variables_from_slim(missing, small_variables, strict=False)
    np.testing.assert_array_equal(out["batch_stats"][helpers.SMALL_SCOPE]["postnorm"][
        "moving_variance"], small_variables["batch_stats"][helpers.SMALL_SCOPE]["postnorm"][
        "moving_variance"])

    extra = dict(named, **{f"{helpers.SMALL_SCOPE}/logits/extra": np.zeros(3)})
    with pytest.raises(ValueError, match="not in the model") as e:
        slim_names.variables_from_slim(extra, small_variables)
    assert f"{helpers.SMALL_SCOPE}/logits/extra" in str(e.value)
    slim_names.variables_from_slim(extra, small_variables, strict=False)

    for bad in (named[logits_w][:, :, :, :5], named[logits_w].reshape(-1)):
        wrong = dict(named, **{logits_w: bad})
        with pytest.raises(ValueError, match="shapes differ") as e:
            slim_names.variables_from_slim(wrong, small_variables)
        assert logits_w in str(e.value)
        with pytest.raises(ValueError, match="shapes differ"):
            slim_names.variables_from_slim(wrong, small_variables, strict=False)


def test_scope_prefixes_select_the_same_variables(r50_shapes, r50_names):
    def selected(scopes):
        out = set()
        for col in slim_names.COLLECTIONS:
            mask = slim_names.scope_mask(r50_shapes[col], scopes)
            names = slim_names.tree_paths(r50_shapes[col])
            out |= {n for n, m in zip(names, jax.tree_util.tree_leaves(mask), strict=True) if m}
        return out

    assert selected([f"{R50}/logits"]) == {f"{R50}/logits/weights", f"{R50}/logits/biases"}
    assert selected([f"{R50}/postnorm/"]) == {
        f"{R50}/postnorm/{v}" for v in ("gamma", "beta", "moving_mean", "moving_variance")}
    for scopes in ([f"{R50}/block1"], [f"{R50}/block2/unit_3", f"{R50}/logits"], [R50],
                   [f"{R50}/block4/unit_1/bottleneck_v2/shortcut"]):
        want = {n for n in r50_names if slim_names.in_scopes(n, scopes)}
        assert want and selected(scopes) == want
    assert len(selected([f"{R50}/block1"])) == sum(
        n.startswith(f"{R50}/block1/") for n in r50_names)
    assert selected([R50]) == set(r50_names)
    assert selected([f"{R50}/logit"]) == set()  # component-wise, not a string prefix
    assert slim_names.parse_scopes(f" {R50}/logits/, ,{R50}/postnorm") == [
        f"{R50}/logits", f"{R50}/postnorm"]
    slim_names.check_scopes([f"{R50}/logits"], r50_names)
    with pytest.raises(ValueError, match="matches no variable"):
        slim_names.check_scopes([f"{R50}/logit"], r50_names)


def test_scope_unit_1_does_not_select_unit_10():
    shapes = _shapes(resnet_v2_101(10), 32)
    names = slim_names.slim_names(shapes)
    scope = "resnet_v2_101/block3/unit_1"
    chosen = {n.split("/bottleneck_v2")[0] for n in names if slim_names.in_scopes(n, [scope])}
    assert chosen == {scope}
    assert any(n.startswith("resnet_v2_101/block3/unit_10/") for n in names)
