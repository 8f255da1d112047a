"""The extra attack families (alp_jax.attacks): restarts, CW, APGD, Square.

Constraints, tracing and spec grammar run on a small fixed MLP (compiles in a fraction of
a second); strength runs on the session's small ResNet trained on digits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alp_jax  # noqa: F401  (registers the extra specs, as any use of the package does)
from alp_jax import losses, pgd
from alp_jax.attacks import apgd, common, square
from alp_jax.data import digits

N = 64  # attacked validation examples of the trained ResNet
NEW_SPECS = ["pgd_12_3_4_r3", "pgdll_12_3_4_r2", "pgdrnd_12_3_4_r2", "pgdcw_12_3_4",
             "pgdcw_12_3_4_r2", "apgdce_12_8", "apgddlr_12_8_r2", "apgdce_12_6_t2",
             "apgddlr_12_6_t3_r2", "square_12_30", "square_12_20_r2"]


def _mlp_params():
    rng = np.random.RandomState(0)
    return (jnp.asarray(rng.normal(size=(8 * 8 * 3, 32)) / 8, jnp.float32),
            jnp.asarray(rng.normal(size=(32, 10)), jnp.float32))


def _mlp_apply(params, x):
    w1, w2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def _mlp():
    return functools.partial(_mlp_apply, _mlp_params())


def _digits8(bounds=(-1.0, 1.0), n=32):
    lo, hi = bounds
    x, y = digits.load_split("validation", 8)
    return jnp.asarray(lo + (x[:n] + 1) / 2 * (hi - lo)), jnp.asarray(y[:n])


def _attack(spec, logits_fn=None, bounds=(-1.0, 1.0), random_start=True):
    logits_fn = logits_fn or _mlp()
    return jax.jit(lambda x, k, y: pgd.generate_adversarial_examples(
        logits_fn, x, k, spec, bounds, random_start=random_start, labels=y))


def _assert_in_ball(adv, x, eps, bounds):
    adv, x = np.asarray(adv), np.asarray(x)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert np.all(np.isfinite(adv))
    assert np.max(np.abs(adv - x)) <= eps * (1 + 1e-5) + 1e-6
    assert np.all(adv >= bounds[0]) and np.all(adv <= bounds[1])
    assert np.mean(np.abs(adv - x) > eps / 2) > 0.1  # a real perturbation


# ---- constraints, objectives, tracing (MLP) ---------------------------------------------

# Each spec once, cycling through pixel ranges and starts (one compile per case).
_CASES = [(spec, [(-1.0, 1.0), (-0.5, 2.0), (0.0, 1.0)][i % 3], i % 2 == 0)
          for i, spec in enumerate(NEW_SPECS)]


@pytest.mark.slow
@pytest.mark.parametrize("spec,bounds,random_start", _CASES)
def test_outputs_stay_in_eps_ball_and_bounds(spec, bounds, random_start):
    x, _ = _digits8(bounds)
    logits_fn = _mlp()
    y = jnp.argmax(logits_fn(x), -1)  # labels this untrained MLP gets right
    adv = _attack(spec, bounds=bounds, random_start=random_start)(x, jax.random.PRNGKey(1), y)
    _assert_in_ball(adv, x, 12 * (bounds[1] - bounds[0]) / 255, bounds)
    # And each did its job on this model: the label's margin grew on average.
    if not spec.startswith(("pgdll", "pgdrnd")):
        assert np.mean(common.margin(logits_fn(adv), y)) > np.mean(
            common.margin(logits_fn(x), y))


@pytest.mark.slow
def test_original_specs_keep_their_code_path():
    """The extra forms leave pgd/pgdll/pgdrnd without a suffix untouched, and their _r1
    forms are the same attack, output for output (_rK changes nothing but the runs)."""
    x, y = _digits8()
    key = jax.random.PRNGKey(5)
    for spec in ("pgdll_8_2_5", "pgd_8_2_5"):
        s = pgd.parse_attack(spec)
        assert (s.restarts, s.true_label, s.loss, s.targets) == (1, False, "xent", 0)
        direct = jax.jit(lambda x, k, s=s: pgd.run_pgd(_mlp(), x, k, s))(x, key)
        np.testing.assert_array_equal(_attack(spec)(x, key, y), direct)
    for spec in ("pgdrnd_8_2_5", "pgd_8_2_5", "pgdll_8_2_5", "pgdtrue_8_2_5"):
        np.testing.assert_allclose(_attack(spec + "_r1")(x, key, y), _attack(spec)(x, key, y),
                                   atol=1e-6)
        np.testing.assert_array_equal(_attack(spec + "_r1")(x, key, y),
                                      _attack(spec)(x, key, y))
        assert pgd.parse_attack(spec + "_r1") == pgd.parse_attack(spec)
    # The K-run machinery itself, with one run, is the one-run attack too.
    from alp_jax.attacks import restarts

    s = pgd.parse_attack("pgdcw_8_2_5")
    cw1 = jax.jit(lambda x, k, y: restarts.run(_mlp(), x, k, s, labels=y))(x, key, y)
    np.testing.assert_array_equal(_attack("pgdcw_8_2_5_r1")(x, key, y), cw1)


def test_true_label_pgd_uses_the_labels():
    x, y = _digits8()
    key = jax.random.PRNGKey(0)
    wrong = (y + 1) % 10
    a, b = _attack("pgdtrue_8_2_5")(x, key, y), _attack("pgdtrue_8_2_5")(x, key, wrong)
    assert not np.allclose(a, b)
    # pgd (any number of runs) attacks the model's prediction: the labels change nothing.
    for spec in ("pgd_8_2_5", "pgd_8_2_5_r3"):
        np.testing.assert_array_equal(_attack(spec)(x, key, y), _attack(spec)(x, key, wrong))
    ce = lambda z, t: float(np.mean(losses.softmax_cross_entropy(_mlp()(z), t)))
    assert ce(a, y) > ce(x, y)


@pytest.mark.parametrize("spec", ["pgdtrue_8_2_5_r2", "pgdcw_8_2_5", "apgdce_8_5",
                                  "square_8_5"])
def test_true_label_attacks_need_labels(spec):
    x, _ = _digits8()
    with pytest.raises(ValueError, match=spec + ".*labels="):
        pgd.generate_adversarial_examples(_mlp(), x, jax.random.PRNGKey(0), spec)


@pytest.mark.parametrize("spec", ["apgddlr_12_6_t2", "square_12_20"])
def test_vmap_over_keys(spec):
    x, y = _digits8(n=16)
    run = _attack(spec)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    batched = jax.jit(jax.vmap(run, in_axes=(None, 0, None)))(x, keys, y)
    for i in range(3):
        _assert_in_ball(batched[i], x, 12 * 2 / 255, (-1.0, 1.0))
        assert np.mean(np.isclose(batched[i], run(x, keys[i], y), atol=1e-5)) > 0.95
    assert not np.allclose(batched[0], batched[1])


@pytest.mark.parametrize("spec", ["pgd_12_3_4_r2", "pgdcw_12_3_4", "apgddlr_12_6_t2",
                                  "square_12_20_r2"])
def test_no_gradient_into_params(spec):
    x, y = _digits8(n=8)
    params = _mlp_params()

    def f(params):
        adv = pgd.generate_adversarial_examples(functools.partial(_mlp_apply, params), x,
                                                jax.random.PRNGKey(0), spec, labels=y)
        return jnp.sum(jnp.square(adv))

    grads = jax.jit(jax.grad(f))(params)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


@pytest.mark.parametrize("small,large", [("apgdce_8_5", "apgdce_8_500"),
                                         ("square_8_5", "square_8_2000"),
                                         ("pgd_8_2_5_r2", "pgd_8_2_5_r50")])
def test_program_size_does_not_grow_with_iterations(small, large):
    x, y = _digits8(n=8)

    def size(spec):
        fn = lambda x, k, y: pgd.generate_adversarial_examples(_mlp(), x, k, spec, labels=y)
        return len(jax.jit(fn).lower(x, jax.random.PRNGKey(0), y).as_text())

    a, b = size(small), size(large)
    assert abs(b - a) <= 0.02 * a, (a, b)


def test_losses():
    z = jnp.asarray([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = jnp.asarray([0, 0])
    m = common.margin(z, y)
    np.testing.assert_allclose(m, [-2.0, 2.0])
    # margin > 0 means the example is scored wrong; at an exact tie (margin 0) the scoring
    # breaks towards the lower class index, as tf.argmax does.
    tie = jnp.asarray([[1.0, 1.0, 0.0]])
    assert float(common.margin(tie, jnp.asarray([0]))[0]) == 0.0
    assert float(common.margin(tie, jnp.asarray([1]))[0]) == 0.0
    assert bool(losses.topk_correct(tie, jnp.asarray([0]), 1)[0])
    assert not bool(losses.topk_correct(tie, jnp.asarray([1]), 1)[0])
    # DLR: the margin over (z_pi1 - z_pi3); invariant to shifting and scaling the logits.
    np.testing.assert_allclose(apgd.dlr_loss(z, y), [-2.0 / 2.5, 2.0 / 1.5], rtol=1e-6)
    np.testing.assert_allclose(apgd.dlr_loss(3 * z + 7, y), apgd.dlr_loss(z, y), rtol=1e-5)
    t = jnp.asarray([2, 2])
    np.testing.assert_allclose(apgd.dlr_targeted_loss(z, y, t),
                               [(0.5 - 3.0) / (3.0 - 0.5 * (0.5 - 1.0)),
                                (1.0 - 0.0) / (2.0 - 0.5 * (0.5 + 0.0))], rtol=1e-6)


def test_targets_are_the_top_other_classes():
    z = jnp.asarray([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    y = jnp.asarray([1, 4])
    np.testing.assert_array_equal(apgd.top_other_classes(z, y, 3), [[0, 3], [2, 2], [3, 1]])
    with pytest.raises(ValueError, match="'apgddlr_8_5_t5'.*5 target classes.*at most 4"):
        apgd.top_other_classes(z, y, 5, "apgddlr_8_5_t5")


def test_apgd_checkpoints_and_square_schedule():
    assert apgd.checkpoint_schedule(100) == (22, 3, 6)
    assert apgd.checkpoint_schedule(3) == (1, 1, 1)
    assert square.p_selection(0, 1000) == square.P_INIT
    assert square.p_selection(2, 1000) == square.P_INIT / 2  # 20 of 10,000
    assert square.p_selection(999, 1000) == square.P_INIT / 512
    sizes = square.window_sizes(1000, 16, 16)
    assert sizes[0] == 14 and sizes[-1] == 1 and np.all(np.diff(sizes) <= 0)


# ---- spec grammar -----------------------------------------------------------------------

def test_parse_new_specs():
    s = pgd.parse_attack("pgd_16_2_100_r5")
    assert (s.method, s.eps, s.step, s.niter, s.restarts, s.true_label) == (
        "pgd", 16, 2, 100, 5, False)  # _rK does not change the target: the prediction
    s = pgd.parse_attack("pgdtrue_16_2_100_r5")
    assert (s.method, s.eps, s.step, s.niter, s.restarts, s.true_label) == (
        "pgdtrue", 16, 2, 100, 5, True)
    s = pgd.parse_attack("pgdcw_16_2_20")
    assert (s.loss, s.restarts, s.true_label) == ("cw", 1, True)
    s = pgd.parse_attack("apgddlr_16_100_r2_t9")
    assert (s.method, s.eps, s.niter, s.loss, s.targets, s.restarts) == (
        "apgddlr", 16, 100, "dlr", 9, 2)
    assert pgd.parse_attack("apgdce_16_100").loss == "xent"
    s = pgd.parse_attack("square_16_1000")
    assert (s.method, s.eps, s.niter, s.restarts) == ("square", 16, 1000, 1)
    forms = set(pgd.valid_forms())
    assert {"pgd_EPS_STEP_NITER[_rK]", "pgdtrue_EPS_STEP_NITER[_rK]",
            "pgdcw_EPS_STEP_NITER[_rK]", "apgdce_EPS_NITER[_tK][_rK]",
            "apgddlr_EPS_NITER[_tK][_rK]", "square_EPS_NQUERIES[_rK]"} <= forms


@pytest.mark.parametrize("spec,why", [
    ("pgd_16_2_10_x5", "unexpected field 'x5'"),
    ("pgd_16_2_10_r0", "restarts K must be in 1..10000, got 0"),
    ("pgd_16_2_10_r5_r6", "expected pgd_EPS_STEP_NITER[_rK]"),
    ("pgdcw_16_2", "expected pgdcw_EPS_STEP_NITER[_rK]"),
    ("pgdcw_16_2_10_t3", "unexpected field 't3'"),
    ("apgdce_16", "expected apgdce_EPS_NITER[_tK][_rK]"),
    ("apgdce_300_10", "EPS must be in 1..255, got 300"),
    ("apgdce_16_0", "NITER must be in >= 1, got 0"),
    ("apgddlr_16_10_t0", "target classes K must be in 1..10000, got 0"),
    ("apgddlr_16_10_r2_r3", "suffix _rK given twice"),
    ("apgddlr_16_10_rx", "restarts K must be an integer, got 'x'"),
    ("square_16", "expected square_EPS_NQUERIES[_rK]"),
    ("square_16_100_t2", "unexpected field 't2'"),
    ("square_a_100", "EPS must be an integer, got 'a'"),
    ("apgd_16_100", "unknown method 'apgd'"),
])
def test_spec_errors(spec, why):
    with pytest.raises(ValueError) as e:
        pgd.parse_attack(spec)
    msg = str(e.value)
    assert repr(spec) in msg and why in msg
    assert "square_EPS_NQUERIES[_rK]" in msg and "pgdll_EPS_STEP_NITER" in msg


def test_spec_errors_reach_training_and_eval_configs():
    from alp_jax import cli
    from alp_jax.config import default_config

    cfg = default_config()
    cfg.adv_method = "apgdce_16_0"
    with pytest.raises(ValueError, match="'apgdce_16_0'"):
        cli.validate_config(cfg, training=False)
    cfg.adv_method = "apgdce_16_10"
    cli.validate_config(cfg, training=False)


# ---- strength on the trained ResNet -----------------------------------------------------

@pytest.fixture(scope="module")
def resnet(trained_digits):
    """spec -> jitted (images, labels, key) -> (adv, per-example correct)."""
    t = trained_digits
    logits = lambda v, x: t.model.apply(v, x, train=False)

    @functools.cache
    def attack(spec):
        def run(variables, x, y, key):
            adv = pgd.generate_adversarial_examples(lambda z: logits(variables, z), x, key,
                                                    spec, labels=y)
            return adv, losses.topk_correct(logits(variables, adv), y, 1)

        jitted = jax.jit(run)
        return lambda x, y, key: jitted(t.variables, x, y, key)

    return attack


def _data(t):
    return jnp.asarray(t.val_images[:N]), jnp.asarray(t.val_labels[:N])


@pytest.mark.slow
def test_apgd_at_least_as_strong_as_pgd10(trained_digits, resnet):
    x, y = _data(trained_digits)
    key = jax.random.PRNGKey(0)
    pgd_adv, pgd_ok = resnet("pgd_6_2_10")(x, y, key)
    _assert_in_ball(pgd_adv, x, 6 * 2 / 255, (-1, 1))
    clean = float(np.mean(losses.topk_correct(trained_digits.logits(
        trained_digits.variables, x), y, 1)))
    adv, ok = resnet("apgdce_6_20")(x, y, key)
    _assert_in_ball(adv, x, 6 * 2 / 255, (-1, 1))
    assert np.mean(ok) <= np.mean(pgd_ok), (np.mean(ok), np.mean(pgd_ok))
    assert np.mean(pgd_ok) < clean  # the comparison is not vacuous


def test_restarts_never_raise_accuracy(trained_digits, resnet):
    x, y = _data(trained_digits)
    key = jax.random.PRNGKey(3)
    _, one = resnet("pgd_4_1_5_r1")(x, y, key)
    adv, three = resnet("pgd_4_1_5_r3")(x, y, key)
    _assert_in_ball(adv, x, 4 * 2 / 255, (-1, 1))
    one, three = np.asarray(one), np.asarray(three)
    assert np.all(three <= one)  # per example: run 0 is the 1-run attack, same key
    assert np.mean(three) < 1.0


@pytest.mark.slow
def test_square_fools_an_undefended_model(trained_digits, resnet):
    x, y = _data(trained_digits)
    clean = np.mean(losses.topk_correct(trained_digits.logits(trained_digits.variables, x),
                                        y, 1))
    # 1,000 queries: on 16x16 digits 300 leave this model at ~70% (1,000: ~13%).
    adv, ok = resnet("square_16_1000")(x, y, jax.random.PRNGKey(0))
    _assert_in_ball(adv, x, 16 * 2 / 255, (-1, 1))
    assert np.mean(ok) <= clean - 0.5, (clean, np.mean(ok))


def test_every_spec_in_the_readme_table_parses_formats_and_rescales():
    """The README's spec table: each form is a family's form, each example parses and
    formats back to itself, and ``with_eps(example, 8)`` is the documented last column."""
    import os
    import re

    from alp_jax.attacks import grammar

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme) as f:
        text = f.read()
    table = text[text.index("| spec | attack | example | at eps 8 |"):]
    rows = [r for r in table.split("\n\n")[0].splitlines()[2:] if r.startswith("|")]
    forms = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        form, example, at8 = (re.sub(r"`", "", c) for c in (cells[0], cells[2], cells[3]))
        forms.add(form)
        assert form == grammar.form(example.split("_")[0])
        assert grammar.format_spec(grammar.parse_attack(example)) == example
        assert grammar.with_eps(example, 8).spec == at8
        assert grammar.parse_attack(at8).spec == at8
    assert forms == set(grammar.valid_forms()) - {"clean"}  # every family is documented
    # _r1 / _t0 are the defaults; suffix order does not matter.
    assert grammar.canonical("pgd_16_2_20_r1") == "pgd_16_2_20"
    assert grammar.canonical("apgddlr_16_100_r2_t9") == "apgddlr_16_100_t9_r2"
