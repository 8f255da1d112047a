"""The throughput benchmark end to end on a tiny model, its FLOP counts, the fast attack
path (``alp_jax.fast_inference``) against ``model.apply``, and the peers when installed.

Nothing here asserts a timing: only fields, counts and results.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alp_jax import fast_inference, objectives
from alp_jax.pgd import generate_adversarial_examples

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "resnet_v2_small", "--num_classes", "10", "--image_size", "16",
        "--batch", "4", "--steps", "2"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_train_step", ROOT / "benchmarks" / "train_step.py")


FIELDS = {
    "part", "model", "batch", "attack", "niter", "compute_dtype", "device", "date",
    "load_average", "images_per_s", "step_time_s_median", "compile_s", "flops_per_step",
    "flops_per_image", "flops_method", "flops_analytic_per_image", "achieved_flops_per_s",
    "matmul_peak_flops_per_s", "share_of_peak", "device_peak_bytes", "xla_bytes",
    "process_peak_rss_bytes", "model_conv_impl",
}


# The GPU machine has jax, flax, optax (and absl, which they import) but neither TensorFlow
# nor ml_collections: the benchmark must run there as shipped, so the end-to-end run
# blocks both (and torch, which only the peers use).
BLOCKED_RUN = helpers.import_blocker("tensorflow", "tensorflow_datasets", "ml_collections",
                                     "torch") + """
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_end_to_end_records_and_table():
    argv = TINY + ["--attack", "pgdll_16_2_2", "--fast_attack", "--memory_check",
                   "--peak_size", "256"]
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN,
                        str(ROOT / "benchmarks" / "train_step.py"), *argv],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout
    records = [json.loads(x) for x in printed.splitlines() if x.startswith("{")]
    assert [r["part"] for r in records] == ["clean", "attack", "alp"]  # one line each
    assert "img/s" in printed and "GFLOP/img" in printed  # the human table
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["images_per_s"] > 0 and r["compile_s"] > 0
        prov = r["provenance"]  # which code, libraries and devices produced the number
        assert prov["packages"]["jax"] and prov["device_count"] >= 1 and prov["alp_jax"]
        assert r["flops_per_step"] > 0 and 0 < r["share_of_peak"]
        assert r["xla_bytes"] > 0
        assert r["device"].startswith(jax.default_backend())
        if jax.default_backend() == "cpu":
            assert r["device_peak_bytes"] is None  # CPU has no memory_stats()
    clean, attack, alp = records
    assert attack["fast_attack"] and alp["fast_attack"] and not clean["fast_attack"]
    assert alp["memory_ratio_vs_clean_2x_batch"] > 0
    # Same work per example as the reference path: counted on model.apply.
    assert alp["flops_per_image"] > attack["flops_per_image"] > clean["flops_per_image"] / 2


def test_pgd_flops_linear_in_niter(bench):
    records = bench.main(TINY + ["--parts", "attack", "--attack",
                                 "pgdll_16_2_1,pgdll_16_2_2,pgdll_16_2_4", "--steps", "1",
                                 "--warmup", "0", "--peak_size", "256"])
    flops = {r["niter"]: r["flops_per_step"] for r in records}
    per_iter = flops[2] - flops[1]
    assert per_iter > 0
    assert (flops[4] - flops[2]) / 2 == pytest.approx(per_iter, rel=0.01)
    # The jaxpr count multiplies the loop body by NITER itself: also linear, and close
    # to XLA's (which also counts elementwise work).
    analytic = {r["niter"]: r["flops_analytic_per_image"] * r["batch"] for r in records}
    a_iter = analytic[2] - analytic[1]
    assert (analytic[4] - analytic[2]) / 2 == pytest.approx(a_iter, rel=0.01)
    assert a_iter == pytest.approx(per_iter, rel=0.1)


def test_analytic_conv_flops_exclude_padding(bench):
    # A 3x3 SAME convolution on a 2x2 map reads 2 of 3 rows and columns per output.
    x = jnp.zeros((1, 2, 2, 8))
    w = jnp.zeros((3, 3, 8, 4))
    f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert bench.analytic_flops(f, x, w) == 2 * 4 * 4 * 8 * (2 * 2)
    g = lambda x, w: jnp.dot(x, w)
    assert bench.analytic_flops(g, jnp.zeros((3, 5)), jnp.zeros((5, 7))) == 2 * 3 * 5 * 7


@pytest.fixture(scope="module")
def small(bench):
    """(model, variables with non-trivial BatchNorm statistics, so that folding matters)."""
    model, v = bench.init_model("resnet_v2_small", 10, 16, "float32")  # shared init
    leaves, tree = jax.tree_util.tree_flatten(v["batch_stats"])
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    stats = [x + 0.3 * jax.random.uniform(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree_util.tree_map(lambda a: a * (1 + 0.1 * jnp.cos(jnp.arange(a.size))
                                                   ).reshape(a.shape), v["params"])
    return model, {"params": params, "batch_stats": jax.tree_util.tree_unflatten(tree, stats)}


def test_fast_logits_match_model_apply(small):
    model, v = small
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    for fold_bn in (True, False):
        for conv_impl in ("auto", "xla", "im2col"):
            fast = jax.jit(lambda v, x, f=fold_bn, c=conv_impl: fast_inference.fast_logits_fn(
                model, v, fold_bn=f, conv_impl=c)(x))(v, x)
            np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-5,
                                       atol=1e-5 * float(jnp.max(jnp.abs(ref))),
                                       err_msg=f"fold_bn={fold_bn} conv_impl={conv_impl}")


def test_im2col_conv_matches_lax_including_strides_and_padding():
    key = jax.random.PRNGKey(2)
    for h, k, s, pad in [(2, 3, 1, "SAME"), (2, 3, 2, ((1, 1), (1, 1))), (5, 3, 2, "SAME"),
                         (8, 7, 2, ((3, 3), (3, 3))), (4, 1, 2, "SAME")]:
        x = jax.random.normal(key, (2, h, h, 5))
        w = jax.random.normal(jax.random.fold_in(key, h * k), (k, k, 5, 6))

        @jax.jit
        def both(x, w, s=s, pad=pad):
            ref = jax.lax.conv_general_dilated(x, w, (s, s), pad,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return ref, fast_inference.im2col_conv(x, w, s, pad)

        ref, got = both(x, w)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_fast_attack_matches_reference_attack(small):
    model, v = small
    x = jax.random.uniform(jax.random.PRNGKey(3), (8, 16, 16, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(4)

    @jax.jit
    def both(v, x):
        ref = generate_adversarial_examples(lambda z: model.apply(v, z, train=False), x, key,
                                            "pgdll_16_2_5")
        fast = generate_adversarial_examples(fast_inference.fast_logits_fn(model, v), x, key,
                                             "pgdll_16_2_5")
        return ref, fast

    ref, fast = both(v, x)
    # sign() of a ~0 gradient component may flip under a different summation order.
    assert float(jnp.mean(ref == fast)) > 0.99


def test_alp_fast_objective_registered(bench):
    cfg = bench.BenchConfig(train_adv_method="pgdll_16_2_1", train_lp_weight=0.5,
                            train_objective="alp_fast")
    obj = objectives.get_objective(cfg)
    ref = objectives.get_objective(bench.BenchConfig(train_adv_method="pgdll_16_2_1",
                                                     train_lp_weight=0.5))
    assert obj.craft is not ref.craft and obj.accuracies is ref.accuracies


def _peer_ok(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


PEER_TINY = ["--image_size", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
             "--attack", "pgdll_16_2_1", "--num_classes", "10", "--units", "1,1,1,1"]


@pytest.mark.skipif(not _peer_ok("torch"), reason="PyTorch not installed (optional peer)")
def test_torch_peer_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/peers/torch_alp.py"),
                          *PEER_TINY, "--parts", "attack,alp"], capture_output=True, text=True,
                         check=True).stdout
    recs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [r["part"] for r in recs] == ["attack", "alp"]
    assert all(r["images_per_s"] > 0 and r["impl"].startswith("pytorch") for r in recs)


@pytest.mark.skipif(not (_peer_ok("tensorflow") and _peer_ok("tf_slim")),
                    reason="TensorFlow / tf-slim not installed (the tf extra)")
def test_tf_slim_peer_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/peers/tf_slim_alp.py"),
                          *PEER_TINY, "--parts", "alp"], capture_output=True, text=True,
                         check=True).stdout
    recs = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [r["part"] for r in recs] == ["alp"] and recs[0]["images_per_s"] > 0
