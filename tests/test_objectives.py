"""The paper's other objectives and TRADES (alp_jax.objectives): loss terms against hand
computations, TRADES' attack, and every objective's digits config training without NaN.
"""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alp_jax import configs, losses, objectives, steps
from alp_jax.data import digits

LS = 0.1


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_xent(logits, labels, ls):
    n = logits.shape[-1]
    targets = np.eye(n)[labels] * (1 - ls) + ls / n
    return np.mean(-np.sum(targets * _np_log_softmax(logits), -1))


def _tiny():
    rng = np.random.RandomState(0)
    clean = rng.normal(size=(4, 3)).astype(np.float32) * 2
    adv = rng.normal(size=(4, 3)).astype(np.float32) * 2
    labels = np.array([0, 2, 1, 2])
    return clean, adv, labels


# ---- loss terms by hand -----------------------------------------------------------------

def test_kl_divergence_by_hand():
    p = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    q = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], np.float32)
    pp, lq = np.exp(_np_log_softmax(p)), _np_log_softmax(q)
    want = np.sum(pp * (np.log(pp) - lq), -1)
    np.testing.assert_allclose(losses.kl_divergence(p, q), want, rtol=1e-5)
    np.testing.assert_allclose(losses.kl_divergence(p, p), [0, 0], atol=1e-6)
    # By hand for the uniform row: log(3) - log_softmax(q)[j] averaged over j.
    np.testing.assert_allclose(want[1], np.mean(np.log(1 / 3) - lq[1]), rtol=1e-6)


def test_clp_loss_by_hand():
    clean, _, labels = _tiny()
    terms = objectives.clp_objective(LS, 0.5, mixed=False).loss(clean, labels, None)
    np.testing.assert_allclose(terms["loss_xent"], _np_xent(clean, labels, LS), rtol=1e-5)
    pairs = [(clean[0] - clean[1]) ** 2, (clean[2] - clean[3]) ** 2]
    np.testing.assert_allclose(terms["loss_clp"], 0.5 * np.mean(pairs), rtol=1e-5)
    assert float(objectives.clp_objective(LS, 0.0, False).loss(clean, labels, None)[
        "loss_clp"]) == 0.0
    with pytest.raises(ValueError, match="even batch, got 3"):
        objectives.clp_objective(LS, 0.5, False).loss(clean[:3], labels[:3], None)


def test_clp_pairs_only_clean_examples_of_a_mixed_batch():
    clean, adv, labels = _tiny()
    mixed = steps.interleave(jnp.asarray(clean), jnp.asarray(adv))
    terms = objectives.clp_objective(LS, 0.5, mixed=True).loss(mixed, labels, None)
    both = np.concatenate([clean, adv])
    np.testing.assert_allclose(terms["loss_xent"],
                               _np_xent(both, np.concatenate([labels, labels]), LS), rtol=1e-5)
    pairs = [(clean[0] - clean[1]) ** 2, (clean[2] - clean[3]) ** 2]
    np.testing.assert_allclose(terms["loss_clp"], 0.5 * np.mean(pairs), rtol=1e-5)


def test_lsq_loss_by_hand():
    clean, adv, labels = _tiny()
    terms = objectives.lsq_objective(LS, 0.05, mixed=False).loss(clean, labels, None)
    np.testing.assert_allclose(terms["loss_xent"], _np_xent(clean, labels, LS), rtol=1e-5)
    np.testing.assert_allclose(terms["loss_lsq"], 0.05 * np.sum(clean ** 2) / clean.size,
                               rtol=1e-5)
    mixed = steps.interleave(jnp.asarray(clean), jnp.asarray(adv))
    terms = objectives.lsq_objective(LS, 0.05, mixed=True).loss(mixed, labels, None)
    np.testing.assert_allclose(terms["loss_lsq"],
                               0.05 * (np.sum(clean ** 2) + np.sum(adv ** 2)) / (2 * clean.size),
                               rtol=1e-5)
    assert float(objectives.lsq_objective(LS, 0.0, False).loss(clean, labels, None)[
        "loss_lsq"]) == 0.0


def test_trades_loss_by_hand():
    clean, adv, labels = _tiny()
    mixed = steps.interleave(jnp.asarray(clean), jnp.asarray(adv))
    terms = objectives.trades_objective(0.0, 6.0, mixed=True).loss(mixed, labels, None)
    # Cross-entropy on the clean half only.
    np.testing.assert_allclose(terms["loss_xent"],
                               np.mean(-_np_log_softmax(clean)[np.arange(4), labels]), rtol=1e-5)
    p = np.exp(_np_log_softmax(clean))
    kl = np.sum(p * (_np_log_softmax(clean) - _np_log_softmax(adv)), -1)
    np.testing.assert_allclose(terms["loss_kl"], 6.0 * np.mean(kl), rtol=1e-5)
    assert set(terms) == {"loss_xent", "loss_kl"}


def test_trades_gradient_reaches_both_halves():
    clean, adv, labels = _tiny()
    loss = objectives.trades_objective(0.0, 6.0, mixed=True).loss

    def total(c, a):
        return sum(loss(steps.interleave(c, a), labels, None).values())

    gc, ga = jax.grad(total, argnums=(0, 1))(jnp.asarray(clean), jnp.asarray(adv))
    assert np.abs(gc).sum() > 0 and np.abs(ga).sum() > 0


def test_objective_config_errors():
    def cfg(**kw):
        return helpers.digits_config(**kw)

    with pytest.raises(ValueError, match="needs adversarial examples.*got 'clean'"):
        objectives.get_objective(cfg(train_objective="trades"))
    for bad in ("pgdll_16_2_10", "pgd_16_2_10_r3", "pgdcw_16_2_10"):
        with pytest.raises(ValueError, match=f"plain pgd_EPS_STEP_NITER.*{bad}"):
            objectives.get_objective(cfg(train_objective="trades", train_adv_method=bad))
    with pytest.raises(ValueError, match="Unknown train_objective 'alpp'.*clp, lsq, trades"):
        objectives.get_objective(cfg(train_objective="alpp"))
    for name in ("alp", "clp", "lsq"):
        assert isinstance(objectives.get_objective(cfg(train_objective=name)),
                          objectives.Objective)


# ---- TRADES' attack ---------------------------------------------------------------------

@pytest.mark.slow
def test_trades_attack_increases_the_kl_term(trained_digits):
    t = trained_digits
    variables = t.variables
    images = jnp.asarray(t.val_images[:64])

    def logits_fn(x):
        return t.model.apply(variables, x, train=False)

    key = jax.random.PRNGKey(3)
    spec = "pgd_16_2_10"
    adv = jax.jit(lambda x, k: objectives.trades_attack(logits_fn, x, k, spec))(images, key)
    clean_logits = logits_fn(images)
    eps = 16 * 2 / 255
    assert float(jnp.max(jnp.abs(adv - images))) <= eps + 1e-6
    assert float(jnp.min(adv)) >= -1.0 and float(jnp.max(adv)) <= 1.0
    # The attack's start, x + small noise, and where the ascent ends.
    start = objectives.trades_attack(logits_fn, images, key, "pgd_16_2_1")
    kl_adv = float(jnp.mean(losses.kl_divergence(clean_logits, logits_fn(adv))))
    kl_start = float(jnp.mean(losses.kl_divergence(clean_logits, logits_fn(start))))
    noise = jax.random.normal(key, images.shape) * (objectives.TRADES_START_STD * 2)
    kl_noise = float(jnp.mean(losses.kl_divergence(
        clean_logits, logits_fn(jnp.clip(images + noise, -1, 1)))))
    assert kl_noise < 1e-3, kl_noise
    assert kl_adv > kl_start > kl_noise
    assert kl_adv > 0.5, kl_adv
    # Maximising the KL moves predictions: accuracy on the TRADES examples drops.
    assert helpers.accuracy(logits_fn(adv), t.val_labels[:64]) < t.clean_accuracy - 0.3


# ---- every objective's digits config trains ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["clp", "lsq", "trades"])
def test_digits_config_trains_without_nan(name, small_variables):
    cfg = configs.get_config(f"digits_{name}")
    assert cfg.train_objective == name and cfg.objective_weight > 0
    cfg.num_classes = helpers.NUM_CLASSES
    cfg.examples_per_epoch = digits.num_examples("train")
    model = helpers.small_model(bn_decay=cfg.bn_decay)
    state = helpers.new_state(cfg, model, variables=small_variables)
    step = jax.jit(steps.train_step_from_config(cfg, model))
    it = digits.train_iterator(cfg.dataset_image_size, cfg.batch_size, seed=0)
    term = {"clp": "loss_clp", "lsq": "loss_lsq", "trades": "loss_kl"}[name]
    history = []
    for _ in range(4):
        batch = next(it)
        state, m = step(state, batch["images"], batch["labels"])
        history.append(jax.device_get(m))
    for m in history:
        assert {"loss_xent", term, "loss_wd", "total_loss"} <= set(m)
        assert all(np.isfinite(float(v)) for v in m.values())
        np.testing.assert_allclose(m["total_loss"], m["loss_xent"] + m[term] + m["loss_wd"],
                                   rtol=1e-5)
    assert float(history[-1][term]) > 0
    assert ("adv_accuracy" in history[-1]) == (name == "trades")
