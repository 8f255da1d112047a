"""FAB-T (alp_jax.attacks.fab): the hyperplane-box projection against a linear program,
the step on a linear model, the output constraints, tracing, and strength on the
session's small ResNet trained on digits."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from alp_jax import losses, pgd
from alp_jax.attacks import common, fab, grammar
from alp_jax.attacks.grammar import AttackSpec
from alp_jax.data import digits

BOUNDS = [(-1.0, 1.0), (0.0, 1.0), (-0.5, 2.0)]


def _spec(eps: int, niter: int, targets: int = 0, restarts: int = 1) -> AttackSpec:
    name = f"fabt_{eps}_{niter}" + (f"_t{targets}" if targets else "") + (
        f"_r{restarts}" if restarts > 1 else "")
    return AttackSpec("fabt", eps=eps, niter=niter, restarts=restarts, targets=targets,
                      spec=name)


def _lp_min_linf(t, w, b, lo, hi):
    """min ||d||_inf s.t. w.(t + d) = b, lo <= t + d <= hi (variables d, s): the optimum or
    None if infeasible."""
    dim = len(t)
    eye = np.eye(dim)
    a_ub = np.r_[np.c_[eye, -np.ones(dim)], np.c_[-eye, -np.ones(dim)]]
    res = linprog(np.r_[np.zeros(dim), 1.0], a_ub, np.zeros(2 * dim), np.r_[w, 0.0][None],
                  [b - w @ t], bounds=[(lo - ti, hi - ti) for ti in t] + [(0, None)],
                  method="highs")
    return res.fun if res.status == 0 else None


def _project(t, w, b, lo, hi):
    return np.asarray(fab.project_linf_hyperplane_box(
        jnp.asarray(t[None], jnp.float32), jnp.asarray(w[None], jnp.float32),
        jnp.asarray([b], jnp.float32), lo, hi))[0]


# ---- the projection ---------------------------------------------------------------------

def test_projection_is_the_minimal_feasible_point():
    rng = np.random.RandomState(0)
    feasible = 0
    project = jax.jit(fab.project_linf_hyperplane_box, static_argnums=(3, 4))
    for trial in range(60):
        dim = 6
        lo, hi = BOUNDS[trial % 3]
        t = rng.uniform(lo, hi, dim)
        w = rng.normal(size=dim) * (rng.rand(dim) > 0.2)  # some zero weights
        b = w @ t + rng.normal() * rng.choice([0.1, 1.0, 3.0])
        d = np.asarray(project(jnp.asarray(t[None], jnp.float32),
                               jnp.asarray(w[None], jnp.float32),
                               jnp.asarray([b], jnp.float32), lo, hi))[0]
        assert np.all(t + d >= lo - 1e-6) and np.all(t + d <= hi + 1e-6)
        assert np.all(d[w == 0] == 0)
        best = _lp_min_linf(t, w, b, lo, hi)
        if best is None:
            continue
        feasible += 1
        assert abs(w @ (t + d) - b) <= 1e-4 * (1 + np.abs(w).sum()), trial
        assert abs(np.max(np.abs(d), initial=0.0) - best) <= 1e-5 * (1 + best), trial
    assert feasible > 30  # most problems are feasible: the comparison is not vacuous


def test_projection_goes_to_the_nearest_corner_when_out_of_reach():
    t = np.array([0.2, 0.5, 0.9])
    w = np.array([1.0, -2.0, 0.5])
    for lo, hi in BOUNDS[:2]:
        # w.z ranges over [w.corner_low, w.corner_high]; ask for more than the maximum.
        corner_high = np.where(w > 0, hi, lo)
        d = _project(np.clip(t, lo, hi), w, w @ corner_high + 1.0, lo, hi)
        np.testing.assert_allclose(np.clip(t, lo, hi) + d, corner_high, atol=1e-6)


def test_fab_step_on_a_linear_model_lands_on_the_boundary():
    rng = np.random.RandomState(1)
    w = rng.normal(size=12)
    x0 = rng.uniform(-1, 1, (1, 12)).astype(np.float32)
    c = -float(w @ x0[0]) - 0.3  # f_t - f_y = w.x + c is -0.3 at x0
    df = -0.3
    x = jnp.asarray(x0)
    # From x0 both projections coincide; eta = 1 does not overshoot: exactly the projection.
    x1 = np.asarray(fab.fab_step(x, x, jnp.asarray([df]), jnp.asarray(w[None], jnp.float32),
                                 (-1.0, 1.0), eta=1.0))
    assert abs(w @ x1[0] + c) < 1e-4
    best = _lp_min_linf(x0[0].astype(np.float64), w, -c, -1.0, 1.0)
    assert abs(np.max(np.abs(x1 - x0)) - best) < 1e-5
    # eta > 1 overshoots the linear boundary (the reference's extrapolation).
    x2 = np.asarray(fab.fab_step(x, x, jnp.asarray([df]), jnp.asarray(w[None], jnp.float32),
                                 (-1.0, 1.0)))
    assert w @ x2[0] + c > 0


# ---- constraints and tracing (small MLP) ------------------------------------------------

def _mlp_apply(params, x):
    w1, w2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


@functools.cache
def _mlp():
    rng = np.random.RandomState(0)
    params = (jnp.asarray(rng.normal(size=(8 * 8 * 3, 32)) / 8, jnp.float32),
              jnp.asarray(rng.normal(size=(32, 10)), jnp.float32))
    return functools.partial(_mlp_apply, params)


def _digits8(bounds=(-1.0, 1.0), n=32):
    """Digits at 8x8 in ``bounds`` and labels: the MLP's own predictions (an untrained
    model), but for the first four, which get a wrong label (misclassified when clean)."""
    lo, hi = bounds
    x, _ = digits.load_split("validation", 8)
    x = jnp.asarray(lo + (x[:n] + 1) / 2 * (hi - lo))
    y = jnp.argmax(_mlp()(x), -1)
    return x, y.at[:4].set((y[:4] + 1) % 10)


def _fab(spec, bounds=(-1.0, 1.0), random_start=True, logits_fn=None):
    f = logits_fn or _mlp()
    return jax.jit(lambda x, y, k: fab.run(f, x, k, spec, bounds=bounds,
                                           random_start=random_start, labels=y))


@pytest.mark.parametrize("bounds,random_start,restarts", [
    ((-1.0, 1.0), True, 1), ((0.0, 1.0), True, 2), ((-0.5, 2.0), False, 1)])
def test_outputs_stay_in_eps_ball_and_bounds(bounds, random_start, restarts):
    x, y = _digits8(bounds)
    eps = 8 * (bounds[1] - bounds[0]) / 255
    adv = np.asarray(_fab(_spec(8, 10, 3, restarts), bounds, random_start)(
        x, y, jax.random.PRNGKey(0)))
    x = np.asarray(x)
    assert adv.shape == x.shape and adv.dtype == x.dtype and np.all(np.isfinite(adv))
    assert np.max(np.abs(adv - x)) <= eps * (1 + 1e-5) + 1e-6
    assert np.all(adv >= bounds[0]) and np.all(adv <= bounds[1])
    changed = np.any(adv != x, axis=(1, 2, 3))
    margin = np.asarray(common.margin(_mlp()(jnp.asarray(adv)), y))
    assert np.all(margin[changed] > 0)  # every perturbed example is misclassified
    assert not np.any(changed[:4])  # misclassified when clean: returned as they are
    assert 0 < changed.sum() < len(x) - 4  # some fooled, not all: eps binds


def test_jit_and_vmap_over_keys():
    x, y = _digits8()
    f = _mlp()

    def attack(spec):
        return jax.jit(jax.vmap(lambda k: fab.run(f, x, k, spec, labels=y)))

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    # One run per target starts at the clean image: the result does not depend on the key.
    one = np.asarray(attack(_spec(255, 5, 2))(keys))
    np.testing.assert_array_equal(one[0], one[1])
    # A restart starts at a random point: per example never a larger perturbation than the
    # first run alone, and every perturbed example is misclassified.
    two = np.asarray(attack(_spec(255, 5, 2, restarts=2))(keys))
    norm = lambda a: np.max(np.abs(a - np.asarray(x)), axis=(1, 2, 3))
    for adv in two:
        assert np.all(norm(adv) <= norm(one[0]) + 1e-7)
        changed = norm(adv) > 0
        assert np.all(np.asarray(common.margin(f(jnp.asarray(adv)), y))[changed] > 0)


def test_restart_points_are_at_half_eps():
    x = jnp.zeros((4, 5, 5, 3))
    eps = 0.4
    a, b = (np.asarray(fab.restart_point(jax.random.PRNGKey(i), x, eps, (-1.0, 1.0)))
            for i in (0, 1))
    np.testing.assert_allclose(np.max(np.abs(a), axis=(1, 2, 3)), eps / 2, rtol=1e-6)
    assert not np.array_equal(a, b)
    clipped = np.asarray(fab.restart_point(jax.random.PRNGKey(0), x - 1.0, eps, (-1.0, 1.0)))
    assert np.all(clipped >= -1.0)


def test_more_targets_never_give_a_larger_perturbation():
    x, y = _digits8()
    f = _mlp()
    key = jax.random.PRNGKey(0)
    norms = {}
    for k in (1, 3):
        adv = _fab(_spec(255, 10, k))(x, y, key)
        fooled = np.asarray(common.margin(f(adv), y)) > 0
        norms[k] = np.where(fooled, np.asarray(fab.linf_norm(adv - x)), np.inf)
    correct = np.asarray(common.margin(f(x), y)) <= 0
    assert np.all(norms[3][correct] <= norms[1][correct] + 1e-7)
    assert np.mean(np.isfinite(norms[3][correct])) > 0.9  # eps-free: nearly all found


def test_targets_default_to_nine_capped_by_the_classes():
    x, y = _digits8(n=4)
    logits3 = lambda z: _mlp()(z)[:, :3]  # a 3-class model: at most 2 targets
    y3 = jnp.argmax(logits3(x), -1)
    adv = _fab(_spec(255, 3), logits_fn=logits3)(x, y3, jax.random.PRNGKey(0))
    assert adv.shape == x.shape
    with pytest.raises(ValueError, match="3 target classes.*3 classes"):
        _fab(_spec(255, 3, 3), logits_fn=logits3)(x, y3, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="pass labels="):
        fab.run(logits3, x, jax.random.PRNGKey(0), _spec(8, 3))


# ---- strength on the trained ResNet -----------------------------------------------------

N = 32


@pytest.mark.slow
def test_fab_fools_an_undefended_model_with_small_perturbations(trained_digits):
    t = trained_digits
    x, y = jnp.asarray(t.val_images[:N]), jnp.asarray(t.val_labels[:N])
    logits = lambda z: t.model.apply(t.variables, z, train=False)

    # EPS traced, as the robustness engine fills a template: one compile serves every eps.
    @jax.jit
    def attack(x, y, key, eps):
        spec = dataclasses.replace(_spec(255, 20, 3), eps=eps)
        return fab.run(logits, x, key, spec, labels=y)

    @jax.jit
    def pgd_attack(x, y, key, eps, step):
        spec = dataclasses.replace(pgd.parse_attack("pgd_16_4_10"), eps=eps, step=step)
        return pgd.generate_adversarial_examples(logits, x, key, spec, labels=y)

    # Scored by another program (the fixture's jitted model), as the evaluation does.
    correct = lambda adv: np.asarray(losses.topk_correct(t.logits(t.variables, adv), y, 1))
    key = jax.random.PRNGKey(0)
    clean = correct(x)
    adv16 = attack(x, y, key, 16.0)
    assert np.max(np.abs(np.asarray(adv16 - x))) <= 16 * 2 / 255 * (1 + 1e-5)
    assert np.mean(correct(adv16)) <= 0.05, np.mean(correct(adv16))

    free = attack(x, y, key, 255.0)
    assert np.mean(correct(free)) <= np.mean(clean) - 0.9  # eps-free: nearly every one
    norms = np.asarray(fab.linf_norm(free - x)) * 255 / 2
    fab_median = np.median(np.where(correct(free), np.inf, norms))
    # Per example, the smallest eps of 1, 2, 4, 8, 16 at which PGD fools it.
    smallest = np.full(N, np.inf)
    for eps in (16, 8, 4, 2, 1):
        fooled = correct(pgd_attack(x, y, key, float(eps), max(eps / 4, 1.0))) == 0
        smallest[fooled] = eps
    pgd_median = np.median(smallest)
    assert np.isfinite(pgd_median)
    assert fab_median <= pgd_median, (fab_median, pgd_median)


def test_spec_string_through_the_grammar_and_the_per_example_path():
    s = grammar.parse_attack("fabt_8_50_r2_t3")
    assert (s.method, s.eps, s.niter, s.targets, s.restarts, s.true_label, s.spec) == (
        "fabt", 8, 50, 3, 2, True, "fabt_8_50_t3_r2")
    assert grammar.parse_attack("fabt_16_100").targets == 0  # the default: 9, capped
    assert "fabt_EPS_NITER[_tK][_rK]" in grammar.valid_forms()
    with pytest.raises(ValueError, match="EPS must be in 1..255"):
        grammar.parse_attack("fabt_0_10_t3")
    # The engine's path: a template filled with a traced eps, one key per example, vmap.
    x, y = _digits8(n=8)
    template = grammar.template("fabt_8_5_t2")

    @jax.jit
    def attack(keys, eps):
        spec = dataclasses.replace(template, eps=eps)
        return grammar.generate_per_example(_mlp(), x, keys, spec, labels=y)

    adv = np.asarray(attack(jax.random.split(jax.random.PRNGKey(0), 8), 8.0))
    assert np.max(np.abs(adv - np.asarray(x))) <= 8 * 2 / 255 * (1 + 1e-5)
    changed = np.any(adv != np.asarray(x), axis=(1, 2, 3))
    assert changed.any() and not changed[:4].any()
    assert np.all(np.asarray(common.margin(_mlp()(jnp.asarray(adv)), y))[changed] > 0)
