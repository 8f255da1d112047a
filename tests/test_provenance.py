"""Every output that carries a number says which code, libraries and devices produced it.

Reads ``provenance`` back from a training run's ``config.json`` and first ``metrics.jsonl``
record, from ``alp-robustness``'s and the demo's ``results.json`` (the benchmark records are
checked in ``test_benchmarks.py``), and checks the console's compile line. Also the
TensorBoard image grid and the curves' and grid's plotting on a synthetic suite result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import program_env

from alp_jax import provenance, summaries
from alp_jax.engine import report
from alp_jax.engine.suite import SuiteResult

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_record(rec: dict) -> None:
    """The fields every provenance record carries, with values of this process."""
    import jax

    from alp_jax import __version__

    assert rec["alp_jax"] == __version__
    assert rec["packages"]["jax"] == jax.__version__
    for name in ("jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert rec["packages"][name], name
    assert rec["device_kind"] and rec["platform"] == jax.devices()[0].platform
    assert rec["device_count"] == jax.device_count() and rec["process_count"] == 1
    rev = rec["revision"]
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if head:  # the tests run from a checkout: its commit is the one recorded
        assert rev is not None and rev["commit"] == head and isinstance(rev["dirty"], bool)


def test_record_describes_this_process() -> None:
    rec = provenance.record()
    check_record(rec)
    assert json.loads(json.dumps(rec)) == rec  # JSON as it is
    line = provenance.describe(rec)
    assert rec["packages"]["jax"] in line and rec["device_kind"] in line
    assert provenance.package_versions(("no-such-distribution-xyz",)) == {
        "no-such-distribution-xyz": None}


@pytest.mark.slow
def test_training_run_records_provenance_and_compile_time(tmp_path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "alp_jax.train",
         "--config=digits_alp", f"--output_dir={out}",
         "--config.max_steps=3", "--config.dataset_image_size=8", "--config.batch_size=16",
         "--config.log_every_steps=1", "--config.save_summaries_steps=1",
         "--config.num_summary_images=2", "--config.save_model_steps=0",
         "--hparams=train_adv_method=clean"],  # the cheapest compile
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=program_env(None))
    assert r.returncode == 0, r.stderr[-3000:]
    # The compile is announced before it starts and timed; the steady rate follows.
    assert "Compiling the train step" in r.stderr and "Compiled the train step in" in r.stderr
    assert r.stderr.index("Compiling the train step") < r.stderr.index("step 1/3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_lp_weight"] == 0.5  # still the config, with provenance beside it
    check_record(cfg["provenance"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [1, 2, 3]
    check_record(records[0]["provenance"])
    assert all("provenance" not in x for x in records[1:])  # once per run, not per line


def _suite(n: int = 12) -> SuiteResult:
    """A suite result where one attack equals the worst case at every eps."""
    rng = np.random.default_rng(0)
    attacks, eps = ("pgdtrue_16_2_20_r5", "apgdce_16_100"), (4, 16)
    grid = {(a, e): a.replace("_16_", f"_{e}_") for a in attacks for e in eps}
    clean = np.ones(n, bool)
    correct = {s: rng.random(n) < 0.6 for s in grid.values()}
    for e in eps:
        correct[grid[(attacks[1], e)]] &= correct[grid[(attacks[0], e)]]
    images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    adv = {grid[(a, 16)]: np.clip(images + 0.1, -1, 1) for a in attacks}
    return SuiteResult(attacks=attacks, eps_list=eps, labels=np.arange(n) % 10,
                       clean_correct=clean, correct=correct, grid=grid,
                       seconds=dict.fromkeys(grid.values(), 0.1),
                       zero_grad_fraction=0.0, zero_grad_examples=0.0, clean_images=images,
                       adv_images=adv)


def test_robustness_results_record_provenance(tmp_path) -> None:
    paths = report.write_outputs(str(tmp_path), _suite(), [], {"checkpoint": "x"})
    js = json.loads(open(paths["results.json"]).read())
    check_record(js["provenance"])
    for name in ("robustness_curve.png", "adversarial_examples.png"):
        assert os.path.getsize(paths[name]) > 10_000, name


def test_demo_results_record_provenance(tmp_path) -> None:
    from alp_jax import comparison

    rows = [{"model": "alp", "clean": 0.9, "pgd_16_2_20": 0.5}]
    comparison.write_results(str(tmp_path), rows, ("clean", "pgd_16_2_20"))
    js = json.loads((tmp_path / "results.json").read_text())
    assert js["results"] == rows
    check_record(js["provenance"])


def test_tensorboard_images_are_enlarged_to_a_readable_grid() -> None:
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype(np.float32)
    grid = summaries.image_grid(x, min_size=96, columns=8, gap=2)
    assert grid.shape == (96 + 4, 4 * 98 + 2, 3)  # 16px enlarged 6x; one row of four
    np.testing.assert_array_equal(grid[2:8, 2:8], np.broadcast_to(x[0, 0, 0], (6, 6, 3)))
    assert summaries.image_grid(x[:, :, :, :1]).shape[-1] == 3
    with pytest.raises(ValueError, match="NHWC"):
        summaries.image_grid(x[0])


def test_first_metrics_record_only_carries_provenance(tmp_path) -> None:
    w = summaries.SummaryWriter(str(tmp_path), provenance={"alp_jax": "v"})
    w.scalars(1, {"loss": 1.0})
    w.scalars(2, {"loss": 0.5})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["provenance"] == {"alp_jax": "v"} and "provenance" not in lines[1]
