"""The throughput benchmark end to end on a tiny model, its FLOP counts, that it measures
the programs' step (same builders, same defaults), and the peers when installed.

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

from alp_jax import objectives, steps
from alp_jax import train_state as ts
from alp_jax.config import HPARAMS, default_config
from alp_jax.data import tfrecord_datasets
from alp_jax.pgd import parse_attack

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


@pytest.mark.slow
def test_end_to_end_records_and_table():
    argv = TINY + ["--attack", "pgdll_16_2_2", "--memory_check", "--peak_size", "256"]
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN,
                        str(ROOT / "benchmarks" / "train_step.py"), *argv],
                       cwd=ROOT, env=helpers.program_env(None), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout
    records = [json.loads(x) for x in printed.splitlines() if x.startswith("{")]
    assert [r["part"] for r in records] == ["clean", "attack", "alp"]  # one line each
    assert "img/s" in printed and "GFLOP/img" in printed  # the human table
    head = next(x for x in printed.splitlines() if "img/s" in x).split()
    assert "fast" not in head and "convs" in head
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        # One code path: the model's convolutions are the only implementation choice.
        assert [k for k in r if "conv_impl" in k] == ["model_conv_impl"], sorted(r)
        assert not [k for k in r if "fast" in k or "fold" in k], sorted(r)
        assert r["model_conv_impl"] == "auto"  # the programs' default
        assert r["images_per_s"] > 0 and r["compile_s"] > 0
        prov = r["provenance"]  # which code, libraries and devices produced the number
        assert prov["packages"]["jax"] and prov["device_count"] >= 1 and prov["alp_jax"]
        assert r["flops_per_step"] > 0 and 0 < r["share_of_peak"]
        assert r["xla_bytes"] > 0
        assert r["device"].startswith(jax.default_backend())
        if jax.default_backend() == "cpu":
            assert r["device_peak_bytes"] is None  # CPU has no memory_stats()
    clean, attack, alp = records
    assert alp["memory_ratio_vs_clean_2x_batch"] > 0
    # Same work per example as the reference path: counted with lax convolutions.
    assert alp["flops_per_image"] > attack["flops_per_image"] > clean["flops_per_image"] / 2


@pytest.mark.slow
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


# ---- the benchmark measures what the programs run --------------------------------------

def test_defaults_are_the_programs(bench):
    args, cfg = bench.parse_args([]), default_config()
    assert args.model_conv_impl == cfg.conv_impl == "auto"
    assert args.moving_average_decay == cfg.moving_average_decay == 0.9999
    assert bench.BOUNDS == tuple(cfg.bounds) == (-1.0, 1.0)
    assert bench.EXAMPLES_PER_EPOCH == tfrecord_datasets.PUBLISHED_SIZES["imagenet"]["train"]
    for name in bench.HP_FLAGS:
        assert getattr(args, name) == HPARAMS[name] == cfg[name], name
        assert type(getattr(args, name)) is type(HPARAMS[name]), name
    # Every other hparam is a flag of its own (--batch, --attack, --lp_weight: the
    # benchmark's configurations), HPARAMS' as it is (the step schedule's lists), or
    # unused by a train step (eval_batch_size): a new hparam must be placed here.
    assert set(HPARAMS) - set(bench.HP_FLAGS) == {
        "batch_size", "train_adv_method", "train_lp_weight", "lr_list", "lr_decay_epochs",
        "eval_batch_size"}
    assert args.lp_weight == 0.5 and parse_attack(args.attack).niter == 10  # ALP, PGD-10


BATCH, ATTACK = 4, "pgdll_16_2_2"


def _program_config(bench, args, **overrides):
    """``default_config()`` as a run of the benchmark's model, batch and attack sees it."""
    cfg = default_config()
    cfg.model_name, cfg.num_classes = args.model, args.num_classes
    cfg.dataset_image_size, cfg.batch_size = args.image_size, BATCH
    cfg.train_adv_method, cfg.train_lp_weight = ATTACK, args.lp_weight
    cfg.examples_per_epoch = bench.EXAMPLES_PER_EPOCH
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_alp_step_is_the_programs_step(bench):
    """Two steps of the benchmark's ALP step and of ``train_step_from_config`` on the
    programs' default config: the same new state and metrics, bit for bit; the attack
    part is that step's attack."""
    args = bench.parse_args(TINY[:6] + ["--batch", str(BATCH), "--attack", ATTACK])
    model, variables = bench.init_model(args.model, args.num_classes, args.image_size,
                                        args.compute_dtype, args.model_conv_impl)
    cfg = _program_config(bench, args)
    ours, tx = bench.train_step_fn(args, model, BATCH, ATTACK)
    theirs = steps.train_step_from_config(cfg, model)
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), args.image_size,
                                  moving_average_decay=args.moving_average_decay,
                                  variables=variables)
    _assert_trees_equal(state.opt_state, ts.optimizer_from_config(cfg)[0].init(state.params))
    images, labels, key = bench._inputs(args, BATCH)
    ours, theirs = jax.jit(ours), jax.jit(theirs)
    a = b = state
    for i in range(2):
        k = jax.random.fold_in(key, i)
        a, metrics_a = ours(a, images, labels, k)
        b, metrics_b = theirs(b, images, labels, k)
        assert sorted(metrics_a) == sorted(metrics_b)
        assert "loss_lp" in metrics_a and "adv_accuracy" in metrics_a  # ALP, mixed batch
        _assert_trees_equal(metrics_a, metrics_b)
        _assert_trees_equal(a, b)
    assert int(a.step) == 2 and a.ema_params is not None

    craft = jax.jit(bench.craft_fn(args, model, ATTACK))
    reference = objectives.get_objective(cfg)
    expected = jax.jit(lambda v, x, y, k: reference.craft(
        model, v, x, y, k, parse_attack(cfg.train_adv_method), tuple(cfg.bounds)))
    _assert_trees_equal(craft(variables, images, labels, key),
                        expected(variables, images, labels, key))


@pytest.mark.parametrize("lr_schedule", ["exp_decay", "step", "fixed"])
def test_schedule_is_the_programs(bench, lr_schedule):
    """The learning rate at every boundary of the schedule, as a run computes it (the
    step test above only reaches step 2 of an epoch of 320,292 steps)."""
    args = bench.parse_args(TINY[:6] + ["--lr_schedule", lr_schedule])
    cfg = _program_config(bench, args, lr_schedule=lr_schedule)
    _, ours = bench.optimizer(args, BATCH)
    _, theirs = ts.optimizer_from_config(cfg)
    spe = ts.steps_per_epoch(bench.EXAMPLES_PER_EPOCH, BATCH)
    decay = int(spe * HPARAMS["lr_num_epochs_per_decay"])
    marks = [0, 1, decay - 1, decay, 3 * decay + 1]
    marks += [int(e * spe) + d for e in HPARAMS["lr_decay_epochs"] for d in (0, 1)]
    for step in marks:
        assert float(ours(step)) == float(theirs(step)), (lr_schedule, step)


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
