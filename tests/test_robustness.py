"""The evaluation engine and alp_jax.robustness: specs at other eps, the suite and its worst
case, masking checks, per-example keys and files, the program (on a checkpoint of the
session's digits model) and its clear errors."""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from alp_jax import checkpoints, engine, losses
from alp_jax import robustness as rb
from alp_jax.attacks import grammar
from alp_jax.engine import core

N = 64
SUITE = ("pgd_16_2_5_r2", "apgddlr_16_10", "square_16_100")
EPS = (8, 16)


# ---- specs ------------------------------------------------------------------------------

def test_with_eps():
    assert grammar.with_eps("pgdll_16_2_10", 16).spec == "pgdll_16_2_10"
    assert grammar.with_eps("pgdll_16_2_10", 8).spec == "pgdll_8_1_10"
    assert grammar.with_eps("pgdll_16_2_10", 2).spec == "pgdll_2_1_10"  # STEP at least 1
    assert grammar.with_eps("pgd_16_2_20_r5", 32).spec == "pgd_32_4_20_r5"
    assert grammar.with_eps("pgdcw_8_3_10", 4).spec == "pgdcw_4_2_10"  # 1.5 rounds up
    assert grammar.with_eps("apgddlr_16_100_t3", 4).spec == "apgddlr_4_100_t3"
    s = grammar.with_eps("square_16_1000_r2", 8)
    assert (s.spec, s.eps, s.niter, s.restarts) == ("square_8_1000_r2", 8, 1000, 2)
    assert grammar.with_eps("clean", 8).is_clean
    for bad in (0, 256, 2.5, True):
        with pytest.raises(ValueError, match="eps must be an integer in 1..255"):
            grammar.with_eps("pgd_16_2_10", bad)
    with pytest.raises(ValueError, match="'pgd_16_2'"):
        grammar.with_eps("pgd_16_2", 8)
    with pytest.raises(ValueError, match="'pgd_0_2_10' has EPS 0"):
        grammar.with_eps("pgd_0_2_10", 8)


def test_default_probes():
    # _r1 is the default: the one-run probe is the spec without the suffix.
    p = engine.default_probes(["pgdll_16_2_10", "pgd_16_2_20_r5", "apgdce_16_100"])
    assert p == engine.MaskingProbes("apgdce_128_50", "pgd_16_2_20", "pgd_16_2_80",
                                     "pgd_16_2_20_r5")
    p = engine.default_probes(list(engine.DEFAULT_ATTACKS))
    assert p == engine.MaskingProbes("apgdce_128_50", "pgdtrue_16_2_20", "pgdtrue_16_2_80",
                                     "pgdtrue_16_2_20_r5")
    p = engine.default_probes(["apgdce_16_100"], large_eps_attack="apgddlr_255_20")
    assert p == engine.MaskingProbes("apgddlr_255_20", "pgdtrue_16_2_10", "pgdtrue_16_2_40",
                                     "pgdtrue_16_2_10_r5")


# ---- masking checks on made-up results (what each check reacts to) ---------------------

def _fake(acc: dict[tuple[str, int], float], extra: dict[str, float] | None = None,
          n: int = 100, zero: float = 0.0) -> engine.SuiteResult:
    attacks = tuple(dict.fromkeys(a for a, _ in acc))
    eps_list = tuple(dict.fromkeys(e for _, e in acc))
    rng = np.random.RandomState(0)
    order = rng.permutation(n)

    def correct(a):  # nested sets: a lower accuracy fools a superset
        c = np.zeros(n, bool)
        c[order[:int(round(a * n))]] = True
        return c

    grid = {k: grammar.with_eps(k[0], k[1]).spec for k in acc}
    corr = {grid[k]: correct(v) for k, v in acc.items()}
    corr.update({s: correct(v) for s, v in (extra or {}).items()})
    return engine.SuiteResult(attacks, eps_list, np.zeros(n, np.int32), np.ones(n, bool), corr,
                          grid, dict.fromkeys(corr, 0.0), zero, zero, np.zeros((0, 8, 8, 3)),
                          {})


PROBES = engine.MaskingProbes("apgdce_128_10", "pgd_16_2_5", "pgd_16_2_20", "pgd_16_2_5_r2")
GOOD_PROBES = {"apgdce_128_10": 0.0, "pgd_16_2_5": 0.5, "pgd_16_2_20": 0.47,
               "pgd_16_2_5_r2": 0.48}


def _checks(acc, extra=GOOD_PROBES, zero=0.0):
    return {c["name"]: c for c in engine.masking_checks(_fake(acc, extra, zero=zero), PROBES)}


def test_masking_checks_pass_and_fail_in_words():
    good = {("pgd_16_2_10_r3", 8): 0.6, ("pgd_16_2_10_r3", 16): 0.45,
            ("square_16_100", 8): 0.7, ("square_16_100", 16): 0.5}
    checks = _checks(good)
    assert all(c["passed"] for c in checks.values()), checks
    assert set(checks) == {"large_eps", "more_iterations", "more_restarts", "monotone_in_eps",
                           "black_box", "suite_covers_probes", "zero_gradients"}
    assert "all passed" in engine.format_checks(list(checks.values()))

    # The black box beats every white-box attack by a clear margin: masked gradients.
    c = _checks({**good, ("square_16_100", 16): 0.2})["black_box"]
    assert c["passed"] is False and "FAILED at eps 16" in c["detail"]
    assert "25 examples fooled only by the black box" in c["detail"]
    # More iterations / restarts raising accuracy.
    c = _checks(good, {**GOOD_PROBES, "pgd_16_2_20": 0.6})
    assert c["more_iterations"]["passed"] is False
    assert "more iterations raised accuracy by 10.0%" in c["more_iterations"]["detail"]
    c = _checks(good, {**GOOD_PROBES, "pgd_16_2_5_r2": 0.56})["more_restarts"]
    assert c["passed"] is False and "more restarts" in c["detail"]
    # ... but not a rise within one example or the tolerance.
    assert _checks(good, {**GOOD_PROBES, "pgd_16_2_20": 0.51})["more_iterations"]["passed"]
    # A probe at a suite eps fooling examples the worst case counts as robust.
    c = _checks(good, {**GOOD_PROBES, "pgd_16_2_20": 0.4})["suite_covers_probes"]
    assert c["passed"] is False
    assert "pgd_16_2_20 fools 5 examples the worst case at eps 16" in c["detail"]
    # Large eps leaving accuracy.
    c = _checks(good, {**GOOD_PROBES, "apgdce_128_10": 0.3})["large_eps"]
    assert c["passed"] is False and "30.0%" in c["detail"] and "FAILED" in c["detail"]
    # Accuracy rising with eps.
    c = _checks({**good, ("pgd_16_2_10_r3", 16): 0.7, ("square_16_100", 16): 0.8})
    assert c["monotone_in_eps"]["passed"] is False
    assert "pgd_16_2_10_r3: 60.0% at eps 8 -> 70.0% at eps 16" in c["monotone_in_eps"]["detail"]
    # Zero gradients.
    c = _checks(good, zero=0.9)["zero_gradients"]
    assert c["passed"] is False and "90.0%" in c["detail"]
    # No black box in the suite: said, not silently passed.
    c = _checks({("pgd_16_2_10_r3", 8): 0.6, ("pgd_16_2_10_r3", 16): 0.4})["black_box"]
    assert c["passed"] is None and "Not run" in c["detail"]
    text = engine.format_checks(list(_checks(good, zero=0.9).values()))
    assert "[FAIL] zero_gradients" in text and "1 FAILED (zero_gradients)" in text


# ---- the program on the trained digits model --------------------------------------------

def _save_checkpoint(path, variables, **config):
    meta = {"model_name": "resnet_v2_small", "num_classes": 10, "config": {
        "dataset": "digits", "dataset_image_size": 16, "moving_average_decay": -1.0,
        "bounds": [-1.0, 1.0], "eval_batch_size": 32, **config}}
    if config.get("no_config"):
        meta = {"model_name": "resnet_v2_small", "num_classes": 10}
    checkpoints.save_variables(str(path), jax.device_get(variables), meta)
    return str(path)


def _flag_config(argv):
    fv = flags.FlagValues()
    rb.define_flags(fv)
    fv(["prog", *argv])
    return rb.config_from_flags(fv)


@pytest.fixture(scope="module")
def ckpt(trained_digits, tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt"), trained_digits.variables)


def _run(ckpt, out, *extra, progress=None):
    cfg = _flag_config([f"--checkpoint_path={ckpt}", f"--output_dir={out}",
                        f"--attacks={','.join(SUITE)}", f"--eps={','.join(map(str, EPS))}",
                        "--large_eps_attack=apgddlr_128_10", "--num_images=4", *extra])
    lines = []
    report = rb.run_robustness(cfg, ckpt, out, log=lines.append, progress=progress)
    return report, "\n".join(lines)


@pytest.fixture(scope="module")
def program_run(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("robustness"))
    seen = []
    report, text = _run(ckpt, out, f"--num_examples={N}", progress=seen.append)
    return report, out, text, seen


@pytest.mark.slow
def test_program_writes_results_and_curves(program_run):
    report, out, text, seen = program_run
    for name in ("results.json", "results.csv", "per_example.npz", "robustness_curve.png",
                 "adversarial_examples.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.json")) as f:
        js = json.load(f)
    assert js["num_examples"] == N and js["attacks"] == list(SUITE) and js["eps"] == list(EPS)
    assert js["model_name"] == "resnet_v2_small" and js["moving_average_decay"] == -1.0
    assert js["probes"]["more_iterations"] == "pgd_16_2_20"
    # Compile time is reported apart from attack time, per compiled family template.
    assert set(js["timings"]["compile_seconds"]) >= {"clean", "pgd_EPS_STEP_5_r2",
                                                     "apgddlr_EPS_10", "square_EPS_100"}
    assert js["timings"]["attack_total"] > 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + len(SUITE) * len(EPS) + len(EPS)
    assert {r["spec"] for r in rows} >= {"clean", "pgd_8_1_5_r2", "apgddlr_8_10", "worst_case"}
    assert "| **worst case** |" in text and "Masking checks" in text
    assert "compile" in text and "examples/s" in text
    # Progress after each of the two batches of 32, with running accuracies.
    assert [p.done for p in seen] == [32, 64] and seen[-1].total == N
    assert set(seen[-1].worst_correct) == set(EPS)
    r = report["result"]
    assert [seen[-1].worst_correct[e] for e in EPS] == [int(r.worst_correct(e).sum())
                                                        for e in EPS]
    # The per-example file: index, label, clean and every concrete spec.
    pe = engine.load_per_example(os.path.join(out, "per_example.npz"))
    np.testing.assert_array_equal(pe["index"], np.arange(N))
    assert set(pe) >= {"index", "label", "clean", *r.grid.values(), *report["probes"].specs}
    np.testing.assert_array_equal(pe["pgd_8_1_5_r2"], r.correct["pgd_8_1_5_r2"])
    # Two runs combine by AND (a worst case over both).
    other = dict(pe, clean=np.zeros(N, bool))
    both = engine.combine_worst(pe, other)
    assert not both["clean"].any() and np.array_equal(both["pgd_8_1_5_r2"], pe["pgd_8_1_5_r2"])
    with pytest.raises(ValueError, match="different examples"):
        engine.combine_worst(pe, dict(pe, index=pe["index"] + 1))


@pytest.mark.slow
def test_worst_case_is_below_every_attack_and_checks_pass(program_run, trained_digits):
    report, _, _, _ = program_run
    r = report["result"]
    assert r.clean_accuracy >= 0.9
    for e in EPS:
        w = r.worst_correct(e)
        for a in SUITE:
            c = r.correct[r.grid[(a, e)]]
            assert np.all(w <= c) and r.worst_accuracy(e) <= r.accuracy(a, e)
        assert np.all(w <= r.clean_correct)
    assert r.worst_accuracy(16) <= r.worst_accuracy(8) < r.clean_accuracy
    assert r.accuracy("square_16_100", 16) < r.clean_accuracy  # the black box does something
    # More restarts (same per-example keys as the one-run probe) never fool fewer examples.
    assert np.all(r.correct["pgd_16_2_5_r2"] <= r.correct["pgd_16_2_5"])
    # A normal model passes every masking check ...
    checks = {c["name"]: c for c in report["checks"]}
    weak = checks.pop("suite_covers_probes")
    assert all(c["passed"] for c in checks.values()), engine.format_checks(report["checks"])
    # ... but this deliberately cheap suite (5 PGD steps of 2 < eps 16, 10 APGD steps) is
    # weaker than the 20-step probe, and the report says its worst case is overstated.
    assert weak["passed"] is False and "pgd_16_2_20 fools" in weak["detail"]
    assert "overstates robustness" in weak["detail"]
    assert r.zero_grad_fraction < 0.01


@pytest.mark.slow
def test_one_compile_serves_every_eps(program_run, trained_digits):
    """The suite runs a spec compiled with EPS/STEP as arguments; it must equal the spec
    compiled on its own with the same per-example keys (the spec's seed index, the
    example's index in the split)."""
    r = program_run[0]["result"]
    spec = "pgd_8_1_5_r2"
    x = jnp.asarray(trained_digits.val_images[:32])
    y = jnp.asarray(trained_digits.val_labels[:32])
    base = jax.random.fold_in(jax.random.PRNGKey(0), grammar.seed_index(spec))
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(32))
    model = trained_digits.model
    adv = jax.jit(lambda v, x, y, k: grammar.generate_per_example(
        lambda z: model.apply(v, z, train=False), x, k, spec, labels=y))(
        trained_digits.variables, x, y, keys)
    ok = np.asarray(losses.topk_correct(trained_digits.logits(trained_digits.variables, adv),
                                        y, 1))
    np.testing.assert_array_equal(ok, r.correct[spec][:32])
    np.testing.assert_allclose(adv[:4], r.adv_images[spec], atol=1e-5)
    # The seed ignores _rK: the K-run attack's first run is the one-run attack.
    assert grammar.seed_index("pgd_8_1_5_r2") == grammar.seed_index("pgd_8_1_5")


@pytest.mark.slow
def test_every_example_counts_and_a_split_smaller_than_a_batch(ckpt, tmp_path):
    """40 examples in batches of 32: the partial batch is padded, not dropped; 10 examples
    (fewer than one batch) work; the counts are checked."""
    from alp_jax.data import digits

    seen = []
    report, _ = _run(ckpt, str(tmp_path / "a"), "--num_examples=40", "--attacks=pgdll_16_2_2",
                     "--eps=16", progress=seen.append)
    assert report["num_examples"] == report["result"].num_examples == 40
    assert [p.done for p in seen] == [32, 40]
    np.testing.assert_array_equal(report["result"].index, np.arange(40))
    n_split = len(digits.load_split("validation", 16)[1])
    assert n_split % 32, "the digits split should not be a multiple of the batch"
    report, _ = _run(ckpt, str(tmp_path / "b"), "--num_examples=10", "--attacks=pgdll_16_2_2",
                     "--eps=16")
    assert report["result"].num_examples == 10
    # In memory: every example of a split, batches padded to the devices and masked.
    x, y = digits.load_split("validation", 16)
    batches = list(core.array_batches(x[:45], y[:45], 32, devices=3))
    assert [len(b["labels"]) for b in batches] == [33, 33]
    assert [int(b["mask"].sum()) for b in batches] == [32, 13]
    np.testing.assert_array_equal(np.concatenate([b["index"][b["mask"]] for b in batches]),
                                  np.arange(45))


def test_labels_outside_the_classes_are_refused(trained_digits):
    batch = [{"images": trained_digits.val_images[:4], "labels": np.array([0, 1, 10, 2])}]
    with pytest.raises(ValueError, match="10"):
        engine.evaluate_specs(engine.ModelLogits(trained_digits.model),
                              trained_digits.variables, batch, ["clean"], num_classes=10)


def test_masking_checks_flag_a_quantised_model(trained_digits):
    """Logits through a non-differentiable quantiser (round): gradients are all zero, so
    white-box attacks only add noise; the checks must say so."""
    model = trained_digits.model
    masked = lambda v, x: jnp.round(model.apply(v, x, train=False))
    batches = [{"images": trained_digits.val_images[:32], "labels": trained_digits.val_labels[:32]}]
    probes = engine.MaskingProbes("apgdce_128_10", "pgd_16_2_5_r2", "pgd_16_2_5_r2",
                                  "pgd_16_2_5_r2")
    r = engine.evaluate_suite(masked, batches, ["pgd_16_2_5_r2"], [16],
                              variables=trained_digits.variables, num_classes=10,
                              extra_specs=probes.specs, num_images=0)
    assert r.accuracy("pgd_16_2_5_r2", 16) >= 0.9  # "robust" by masking
    checks = {c["name"]: c for c in engine.masking_checks(r, probes)}
    assert checks["zero_gradients"]["passed"] is False
    assert "100.0% of the input-gradient entries" in checks["zero_gradients"]["detail"]
    assert checks["large_eps"]["passed"] is False
    assert "overstate" in engine.format_checks(list(checks.values()))


# ---- errors -----------------------------------------------------------------------------

def test_checkpoint_without_config_needs_flags(trained_digits, tmp_path):
    ckpt = _save_checkpoint(tmp_path / "ckpt", trained_digits.variables, no_config=True)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as e:
        _flag_config([f"--checkpoint_path={ckpt}", f"--output_dir={out}"])
    msg = str(e.value)
    assert "--dataset=... --dataset_image_size=... --moving_average_decay=..." in msg
    assert ckpt in msg
    assert not os.path.exists(tmp_path / "out")
    cfg = _flag_config([f"--checkpoint_path={ckpt}", f"--output_dir={out}",
                        "--moving_average_decay=0.99", "--dataset=digits",
                        "--dataset_image_size=16"])
    with pytest.raises(ValueError, match="moving_average_decay=-1"):
        rb.run_robustness(cfg, ckpt, out)


def test_unwritable_output_dir_fails_before_any_attack(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = str(blocker / "results")
    cfg = _flag_config([f"--checkpoint_path={ckpt}", f"--output_dir={out}"])
    seen = []
    with pytest.raises(PermissionError, match="is not writable") as e:
        rb.run_robustness(cfg, ckpt, out, progress=seen.append)
    assert out in str(e.value) and not seen


@pytest.mark.parametrize("argv,message", [
    (["--output_dir=/tmp/x"], "--checkpoint_path is required"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--attacks=pgd_16_2_10,apgdce_16"],
     "'apgdce_16'"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--eps=4,x"], "got 'x'"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--eps=4,300"], "got 300"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--eps=4,4"], "repeated"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--attacks=pgd_16_2_10,pgd_16_2_10_r1"],
     "repeated"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--num_examples=0"], "got 0"),
    (["--checkpoint_path=c", "--output_dir=/tmp/x", "--large_eps_attack=square_1"],
     "'square_1'"),
    (["--checkpoint_path=c"], "--output_dir is required"),
])
def test_bad_flags_give_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _flag_config(argv)


def test_flags_parse(ckpt):
    cfg = _flag_config([f"--checkpoint_path={ckpt}", "--output_dir=o",
                        "--attacks=pgdtrue_16_2_20_r5", "--eps=2,16", "--num_examples=96",
                        "--moving_average_decay=-1", "--eval_batch_size=48"])
    assert cfg.robustness_attacks == "pgdtrue_16_2_20_r5" and cfg.robustness_eps == "2,16"
    assert cfg.num_examples == 96 and cfg.moving_average_decay == -1
    assert cfg.eval_batch_size == 48
    assert cfg.dataset == "digits" and cfg.dataset_image_size == 16  # from the checkpoint
    # The defaults are the config's.
    cfg = _flag_config([f"--checkpoint_path={ckpt}", "--output_dir=o"])
    assert engine.suite.parse_attack_list(cfg.robustness_attacks) == engine.DEFAULT_ATTACKS
    assert engine.suite.parse_eps_list(cfg.robustness_eps) == engine.DEFAULT_EPS
