"""The original PGD attacks (alp_jax.pgd): constraints, targets, strength, specs, tracing.

Behaviour that needs a real model uses the session's small model trained on digits.
The eps-ball / bounds grid over every method, start and pixel range uses a small fixed
MLP instead (the projection does not depend on the model, and an MLP compiles in a
fraction of a second where the ResNet takes seconds per spec).
"""

from __future__ import annotations

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alp_jax import pgd
from alp_jax.data import digits
from alp_jax.losses import softmax_cross_entropy

N = 64  # attacked validation examples


@pytest.fixture(scope="module")
def resnet(trained_digits):
    """(attack(spec, random_start) -> jitted (variables, images, key) -> adv, data, ...)."""
    model = trained_digits.model

    @functools.cache
    def attack(spec, random_start=True):
        def run(variables, images, key):
            return pgd.generate_adversarial_examples(
                lambda x: model.apply(variables, x, train=False), images, key, spec,
                random_start=random_start)
        return jax.jit(run)

    return attack


def _eps(spec, bounds):
    return pgd.parse_attack(spec).eps * (bounds[1] - bounds[0]) / 255.0


def _assert_valid(adv, x, eps, bounds, *, saturated=0.5):
    """Inside the eps-ball and the bounds, and a real perturbation (not the clean image)."""
    adv, x = np.asarray(adv), np.asarray(x)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert np.all(np.isfinite(adv))
    assert np.max(np.abs(adv - x)) <= eps * (1 + 1e-5) + 1e-6
    assert np.all(adv >= bounds[0]) and np.all(adv <= bounds[1])
    # Signed steps push most pixels that can move onto the ball's surface or the bounds.
    movable = (x > bounds[0] + 1e-6) | (x < bounds[1] - 1e-6)
    at_limit = (np.abs(np.abs(adv - x) - eps) < 1e-5) | (adv == bounds[0]) | (adv == bounds[1])
    assert np.mean(at_limit[movable]) >= saturated
    assert np.mean(np.abs(adv - x) > eps / 2) > 0.1


# ---- constraints on a small MLP: every method, start and pixel range -------------------

def _mlp():
    rng = np.random.RandomState(0)
    w1 = jnp.asarray(rng.normal(size=(8 * 8 * 3, 32)) / 8, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(32, 10)), jnp.float32)
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "pgdll", "pgdrnd"])
@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.0, 1.0), (-0.5, 2.0)])
def test_attack_stays_in_eps_ball_and_bounds(method, random_start, bounds):
    lo, hi = bounds
    digits8 = digits.load_split("validation", 8)[0][:32]  # in [-1, 1]
    x = jnp.asarray(lo + (digits8 + 1) / 2 * (hi - lo))  # the same images in these bounds
    spec = f"{method}_12_3_6"
    logits_fn = _mlp()
    adv = jax.jit(lambda x, k: pgd.generate_adversarial_examples(
        logits_fn, x, k, spec, bounds, random_start=random_start))(x, jax.random.PRNGKey(3))
    eps = 12 * (hi - lo) / 255
    _assert_valid(adv, x, eps, bounds)
    # And it did its job against this model: the attack objective moved the right way.
    clean = logits_fn(x)
    if method == "pgd":
        target = jnp.argmax(clean, -1)
        assert np.mean(softmax_cross_entropy(logits_fn(adv), target)) > np.mean(
            softmax_cross_entropy(clean, target))
    elif method == "pgdll":
        target = jnp.argmin(clean, -1)
        assert np.mean(softmax_cross_entropy(logits_fn(adv), target)) < np.mean(
            softmax_cross_entropy(clean, target))


def test_no_random_start_is_deterministic_and_random_start_is_not():
    x = jnp.asarray(digits.load_split("validation", 8)[0][:16])
    logits_fn = _mlp()

    @functools.partial(jax.jit, static_argnums=0)
    def run(rs, key):
        return pgd.generate_adversarial_examples(logits_fn, x, key, "pgd_8_2_1",
                                                 random_start=rs)

    a, b = run(False, jax.random.PRNGKey(0)), run(False, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    # One step from the clean image: exactly x + step*sign(grad), clipped.
    step = 2 * 2 / 255
    grad = jax.grad(lambda z: jnp.sum(softmax_cross_entropy(
        logits_fn(z), jnp.argmax(logits_fn(x), -1))))(x)
    np.testing.assert_allclose(a, np.clip(x + step * np.sign(grad), -1, 1), atol=1e-6)
    c, d = run(True, jax.random.PRNGKey(0)), run(True, jax.random.PRNGKey(1))
    assert not np.allclose(c, d)


def test_clean_spec_returns_the_images():
    x = jnp.ones((2, 8, 8, 3))
    assert pgd.generate_adversarial_examples(_mlp(), x, jax.random.PRNGKey(0), "clean") is x
    assert pgd.parse_attack("clean").is_clean


def test_zero_eps_and_zero_niter_as_in_the_original():
    # The original's spec parser takes any integers: EPS 0 is the clean images through the
    # attack path, NITER 0 the random start alone.
    x = jnp.asarray(digits.load_split("validation", 8)[0][:16])
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(
        pgd.generate_adversarial_examples(_mlp(), x, key, "pgd_0_2_10"), x)
    noise = pgd.generate_adversarial_examples(_mlp(), x, key, "pgd_16_2_0")
    eps = 16 * 2 / 255
    assert np.max(np.abs(noise - x)) <= eps * (1 + 1e-5) and np.all(np.abs(noise) <= 1)
    assert np.mean(np.abs(noise - x) > eps / 2) > 0.1  # uniform noise, not the clean images
    np.testing.assert_array_equal(
        pgd.generate_adversarial_examples(_mlp(), x, key, "pgd_16_2_0", random_start=False), x)


# ---- the trained ResNet -----------------------------------------------------------------

def test_untargeted_pgd_drops_accuracy(trained_digits, resnet):
    t = trained_digits
    x, y = t.val_images[:N], t.val_labels[:N]
    clean = helpers.accuracy(t.logits(t.variables, x), y)
    assert clean >= 0.9 and t.clean_accuracy >= 0.9
    spec = "pgd_16_4_10"
    adv = resnet(spec)(t.variables, x, jax.random.PRNGKey(0))
    _assert_valid(adv, x, _eps(spec, (-1, 1)), (-1, 1))
    adv_acc = helpers.accuracy(t.logits(t.variables, adv), y)
    assert adv_acc <= 0.3 < clean - 0.5, (clean, adv_acc)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgdll", "pgdrnd"])
def test_targeted_attacks_raise_target_probability(trained_digits, resnet, method):
    t = trained_digits
    x = t.val_images[:N]
    spec = f"{method}_16_4_10"
    key = jax.random.PRNGKey(7)
    adv = resnet(spec)(t.variables, x, key)
    _assert_valid(adv, x, _eps(spec, (-1, 1)), (-1, 1))
    clean_logits = t.logits(t.variables, x)
    # The targets the attack chose: least likely class, or random from its target key.
    _, k_target = jax.random.split(key)
    targets, targeted = pgd.choose_labels(method, clean_logits, k_target)
    assert targeted
    if method == "pgdll":
        np.testing.assert_array_equal(targets, np.argmin(clean_logits, -1))
    else:  # uniformly random classes: not just the prediction, several classes
        assert len(np.unique(targets)) >= 5
    p_clean = np.take_along_axis(jax.nn.softmax(clean_logits), targets[:, None], 1)[:, 0]
    adv_logits = t.logits(t.variables, adv)
    p_adv = np.take_along_axis(jax.nn.softmax(adv_logits), targets[:, None], 1)[:, 0]
    already = np.asarray(targets) == np.argmax(clean_logits, -1)
    assert np.all(p_adv[~already] > p_clean[~already])
    assert np.mean(p_adv) > max(5 * np.mean(p_clean), np.mean(p_clean) + 0.1)
    hits = lambda logits: np.mean(np.argmax(logits, -1) == np.asarray(targets))
    assert hits(adv_logits) > hits(clean_logits) + 0.1


def test_attack_uses_the_prediction_not_the_true_label():
    """The original methods ignore true labels: untargeted PGD moves away from the model's
    own prediction, even where that prediction is wrong."""
    x = jnp.asarray(digits.load_split("validation", 8)[0][:32])
    logits_fn = _mlp()
    pred = jnp.argmax(logits_fn(x), -1)
    run = jax.jit(lambda x, k, labels: pgd.generate_adversarial_examples(
        logits_fn, x, k, "pgd_8_2_5", labels=labels))
    key = jax.random.PRNGKey(0)
    a = run(x, key, (pred + 1) % 10)
    b = run(x, key, pred)
    np.testing.assert_array_equal(a, b)
    assert np.mean(softmax_cross_entropy(logits_fn(a), pred)) > np.mean(
        softmax_cross_entropy(logits_fn(x), pred))


def test_vmap_over_keys(trained_digits, resnet):
    t = trained_digits
    x = t.val_images[:N]
    spec = "pgd_16_4_10"
    keys = jax.random.split(jax.random.PRNGKey(11), 3)
    batched = jax.jit(jax.vmap(resnet(spec), in_axes=(None, None, 0)))(t.variables, x, keys)
    assert batched.shape == (3,) + x.shape
    eps = _eps(spec, (-1, 1))
    for i in range(3):
        _assert_valid(batched[i], x, eps, (-1, 1))
        for j in range(i):
            assert np.mean(np.abs(batched[i] - batched[j])) > eps / 10
        # Each vmapped result is that key's attack (up to float noise in the sign steps).
        single = resnet(spec)(t.variables, x, keys[i])
        assert np.mean(np.isclose(batched[i], single, atol=1e-5)) > 0.95


def test_no_gradient_into_params(trained_digits, resnet, small_variables):
    t = trained_digits
    x = t.val_images[:8]
    key = jax.random.PRNGKey(0)
    attack = resnet("pgdll_16_4_10")
    stats = t.variables["batch_stats"]

    def f(params):
        adv = attack({"params": params, "batch_stats": stats}, x, key)
        return jnp.sum(jnp.square(adv))

    grads = jax.jit(jax.grad(f))(t.variables["params"])
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads))
    # ... although the result does depend on the weights.
    other = attack(small_variables, x, key)
    assert not np.allclose(attack(t.variables, x, key), other)


def test_hlo_size_does_not_grow_with_niter(trained_digits):
    t = trained_digits
    x = jnp.asarray(t.val_images[:8])

    def hlo(spec):
        fn = lambda v, x, k: pgd.generate_adversarial_examples(
            lambda z: t.model.apply(v, z, train=False), x, k, spec)
        return len(jax.jit(fn).lower(t.variables, x, jax.random.PRNGKey(0)).as_text())

    one, hundred = hlo("pgd_16_4_1"), hlo("pgd_16_4_100")
    assert abs(hundred - one) <= 0.02 * one, (one, hundred)
    jaxpr = lambda spec: str(jax.make_jaxpr(lambda v, x: pgd.generate_adversarial_examples(
        lambda z: t.model.apply(v, z, train=False), x, jax.random.PRNGKey(0), spec))(
        t.variables, x))
    assert abs(len(jaxpr("pgdll_16_4_100")) - len(jaxpr("pgdll_16_4_1"))) <= 16


# ---- specs ------------------------------------------------------------------------------

def test_parse_attack():
    s = pgd.parse_attack("pgdll_16_2_10")
    assert (s.method, s.eps, s.step, s.niter, s.spec) == ("pgdll", 16, 2, 10, "pgdll_16_2_10")
    assert not s.is_clean and str(s) == "pgdll_16_2_10"
    assert pgd.parse_attack(s) is s
    assert pgd.parse_attack("pgdrnd_255_255_1").eps == 255
    forms = pgd.valid_forms()
    assert {"clean", "pgd_EPS_STEP_NITER[_rK]", "pgdll_EPS_STEP_NITER[_rK]",
            "pgdrnd_EPS_STEP_NITER[_rK]"} <= set(forms)
    with pytest.raises(TypeError):
        pgd.parse_attack(16)


@pytest.mark.parametrize("spec", ["pgd_16_2", "pgd_a_2_3", "foo_1_1_1", "pgd_300_1_1",
                                  "pgd_16_256_1", "pgd_16_2_x", "pgd_16_-2_3", "pgdll_16_2_10_1",
                                  "", "PGD_16_2_10", "pgd_\u00b2_2_3", "pgd_\u0663_2_3"])
def test_spec_errors(spec):
    with pytest.raises(ValueError) as e:
        pgd.parse_attack(spec)
    msg = str(e.value)
    assert repr(spec) in msg
    for form in ("clean", "pgd_EPS_STEP_NITER", "pgdll_EPS_STEP_NITER", "pgdrnd_EPS_STEP_NITER"):
        assert form in msg


def test_spec_errors_say_what_is_wrong():
    def msg(spec):
        with pytest.raises(ValueError) as e:
            pgd.parse_attack(spec)
        return str(e.value)

    assert "EPS" in msg("pgd_a_2_3") and "'a'" in msg("pgd_a_2_3")
    assert "0..255" in msg("pgd_300_1_1") and "300" in msg("pgd_300_1_1")
    assert "'foo'" in msg("foo_1_1_1")
    assert "expected pgd_EPS_STEP_NITER[_rK]" in msg("pgd_16_2")
    assert "NITER" in msg("pgd_16_2_x")
