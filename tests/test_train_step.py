"""Train steps (alp_jax.steps), objectives (alp_jax.objectives) and loss terms (alp_jax.losses).

Train steps run ``default_config()`` on the small model and 16x16 digits at batch 32
(``helpers.digits_config``). The clean run is the session's ``trained_digits`` fixture
(150 steps); adversarial and fine-tuning runs continue from its weights for a few steps.
"""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alp_jax import losses, objectives, slim_names, steps
from alp_jax import train_state as ts

BASE_METRICS = {"loss_xent", "loss_lp", "loss_wd", "total_loss", "learning_rate",
                "current_epoch", "clean_accuracy"}
LOGITS_SCOPE = f"{helpers.SMALL_SCOPE}/logits"


def _assert_metrics(history, keys, config, first_step=0):
    _, schedule = ts.optimizer_from_config(config, config.examples_per_epoch)
    for i, m in enumerate(history):
        assert set(m) == keys
        for k, v in m.items():
            assert np.shape(v) == () and np.isfinite(v), (k, v)
        np.testing.assert_allclose(m["total_loss"], m["loss_xent"] + m["loss_lp"] + m["loss_wd"],
                                   rtol=1e-5)
        step = first_step + i
        np.testing.assert_allclose(m["learning_rate"], schedule(step), rtol=1e-6)
        np.testing.assert_allclose(m["current_epoch"],
                                   (step + 1) * config.batch_size / config.examples_per_epoch,
                                   rtol=1e-5)
        for k in keys & {"clean_accuracy", "adv_accuracy"}:
            assert 0 <= m[k] <= 1
        assert m["loss_xent"] > 0 and m["loss_wd"] > 0


def _l1(a, b):
    return sum(float(np.sum(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _flat_params(state):
    return slim_names.variables_to_slim({"params": state.params})


@pytest.fixture(scope="module")
def adv_run(trained_digits):
    """Mixed-minibatch PGD training (train_lp_weight 0, moving averages off), 6 steps."""
    t = trained_digits
    config = helpers.digits_config(train_adv_method="pgd_16_4_5", train_lp_weight=0.0,
                                   moving_average_decay=-1.0)
    step = helpers.CountedStep.build(config, t.model)
    start = helpers.new_state(config, t.model, variables=t.variables)
    end, history = helpers.train(step, start, 6, start_step=150)
    return config, step, start, end, history


@pytest.fixture(scope="module")
def finetune_run(trained_digits):
    """Fine-tuning only ``resnet_v2_small/logits`` from the trained weights, 5 steps."""
    t = trained_digits
    config = helpers.digits_config(finetune_trainable_scopes=LOGITS_SCOPE)
    step = helpers.CountedStep.build(config, t.model)
    start = helpers.new_state(config, t.model, variables=t.variables)
    end, history = helpers.train(step, start, 5, start_step=150)
    return config, step, start, end, history


# ---- clean training (the session's trained model) ---------------------------------------

def test_clean_training_decreases_the_loss(trained_digits):
    total = [m["total_loss"] for m in trained_digits.history]
    assert np.mean(total[35:40]) < 0.8 * np.mean(total[:5])  # within a few dozen steps
    assert np.mean(total[-5:]) < 0.5 * np.mean(total[:5])
    assert trained_digits.clean_accuracy >= 0.9  # and the model really learned digits


def test_clean_training_metrics(trained_digits):
    t = trained_digits
    _assert_metrics(t.history, BASE_METRICS, t.config)  # no adv_accuracy
    assert all(m["loss_lp"] == 0 for m in t.history)
    assert int(t.state.step) == len(t.history) == 150
    assert np.mean([m["clean_accuracy"] for m in t.history[-10:]]) >= 0.8


@pytest.mark.slow
def test_step_compiles_once(trained_digits, adv_run, finetune_run):
    assert trained_digits.step.traces == 1  # 150 calls (and more from other tests)
    assert adv_run[1].traces == 1 and finetune_run[1].traces == 1


def test_moving_averages_track_the_params(trained_digits):
    t = trained_digits
    old = t.state
    assert old.ema_params is not None and old.ema_batch_stats is not None
    batch = next(helpers.digits.train_iterator(helpers.IMAGE_SIZE, helpers.BATCH_SIZE,
                                               seed=5))
    new, _ = t.step(old, batch["images"], batch["labels"])
    d = min(t.config.moving_average_decay, (1 + 151) / (10 + 151))
    for ema_old, ema_new, value in (
            (old.ema_params, new.ema_params, new.params),
            (old.ema_batch_stats, new.ema_batch_stats, new.batch_stats)):
        want = jax.tree_util.tree_map(lambda a, x: a - (1 - d) * (a - x), ema_old, value)
        assert helpers.tree_allclose(ema_new, want, rtol=1e-5, atol=1e-7)
        gap_old = _l1(ema_old, value)
        gap_new = _l1(ema_new, value)
        assert 0 < gap_new < gap_old
    assert t.step.traces == 1  # the extra call reused the compiled step
    # The averages are what evaluation reads with use_ema.
    assert new.variables(use_ema=True)["params"] is new.ema_params
    assert new.variables()["params"] is new.params
    # A fresh state starts its averages at the initial values.
    state = helpers.new_state(t.config, t.model)
    assert helpers.tree_allclose(state.ema_params, state.params, rtol=0, atol=0)


# ---- mixed-minibatch PGD training -------------------------------------------------------

def test_adversarial_training_without_pairing(adv_run):
    config, _, start, end, history = adv_run
    _assert_metrics(history, BASE_METRICS | {"adv_accuracy"}, config, first_step=0)
    assert all(m["loss_lp"] == 0.0 for m in history)  # exactly zero with weight 0
    # The model was trained on clean digits only: the attack hurts it, and a few steps of
    # adversarial training already help (about 0.2 -> 0.55 on these batches).
    adv = [m["adv_accuracy"] for m in history]
    assert history[0]["clean_accuracy"] >= 0.75 and adv[0] < history[0]["clean_accuracy"] - 0.3
    assert np.mean(adv[-2:]) > adv[0] + 0.1
    changed = [n for n, v in _flat_params(end).items()
               if not np.array_equal(v, _flat_params(start)[n])]
    assert len(changed) == len(_flat_params(start))


def test_moving_average_off_gives_none(adv_run):
    _, _, start, end, _ = adv_run
    assert start.ema_params is None and start.ema_batch_stats is None
    assert end.ema_params is None and end.ema_batch_stats is None
    assert end.variables(use_ema=True)["params"] is end.params


# ---- fine-tuning a scope ----------------------------------------------------------------

def test_finetune_trains_only_the_scope(finetune_run):
    config, _, start, end, history = finetune_run
    _assert_metrics(history, BASE_METRICS, config)
    before, after = _flat_params(start), _flat_params(end)
    logits = {f"{LOGITS_SCOPE}/weights", f"{LOGITS_SCOPE}/biases"}
    assert {n for n in before if slim_names.in_scopes(n, [LOGITS_SCOPE])} == logits
    for name in before:
        if name in logits:
            assert not np.allclose(after[name], before[name]), name
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # Weight decay over the trainable (logits) variables only, at the pre-step params.
    wd = config.weight_decay * sum(np.sum(np.square(before[n].astype(np.float64)))
                                   for n in logits) / 2
    np.testing.assert_allclose(history[0]["loss_wd"], wd, rtol=1e-5)
    everything = config.weight_decay * sum(np.sum(np.square(v.astype(np.float64)))
                                           for v in before.values()) / 2
    assert history[0]["loss_wd"] < 0.5 * everything


# ---- the eval step -----------------------------------------------------------------------

def test_eval_step_counts(trained_digits, small_variables):
    t = trained_digits
    x, y = t.val_images[:64], t.val_labels[:64]
    logits = np.asarray(t.logits(t.variables, x))
    eval_step = jax.jit(steps.make_eval_step(t.model))
    key = jax.random.PRNGKey(0)
    out = eval_step(t.state, x, y, key)
    assert int(out["count"]) == 64
    assert int(out["top1"]) == int(np.sum(logits.argmax(-1) == y))
    top5 = np.sum(np.sum(logits > logits[np.arange(64), y][:, None], -1) < 5)
    assert int(out["top5"]) == int(top5) >= int(out["top1"])
    # A mask drops padding rows; a variables dict works as well as a TrainState.
    mask = np.arange(64) % 2 == 0
    masked = jax.jit(steps.make_eval_step(t.model))(t.variables, x, y, key, mask)
    assert int(masked["count"]) == 32
    assert int(masked["top1"]) == int(np.sum((logits.argmax(-1) == y)[mask]))
    # use_ema reads the moving averages (here: swapped for an untrained initialisation).
    swapped = t.state.replace(ema_params=small_variables["params"],
                              ema_batch_stats=small_variables["batch_stats"])
    ema = jax.jit(steps.make_eval_step(t.model, use_ema=True))(swapped, x, y, key)
    ema_logits = np.asarray(t.logits(small_variables, x))
    assert int(ema["top1"]) == int(np.sum(ema_logits.argmax(-1) == y)) < int(out["top1"]) - 20


# ---- objectives and the mixed minibatch -------------------------------------------------

def test_interleave_and_split():
    a, b = jnp.arange(6.0).reshape(3, 2), -jnp.arange(6.0).reshape(3, 2)
    mixed = steps.interleave(a, b)
    np.testing.assert_array_equal(mixed, [[0, 1], [0, -1], [2, 3], [-2, -3], [4, 5], [-4, -5]])
    clean, adv = objectives.split_mixed(mixed)
    np.testing.assert_array_equal(clean, a)
    np.testing.assert_array_equal(adv, b)


def test_alp_objective_terms():
    rng = np.random.RandomState(0)
    clean = rng.normal(size=(4, 5)).astype(np.float32)
    adv = rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 3, 4, 1])
    mixed = steps.interleave(jnp.asarray(clean), jnp.asarray(adv))
    terms = objectives.alp_objective(0.1, 0.5, mixed=True).loss(mixed, labels, None)
    both = np.concatenate([clean, adv])
    np.testing.assert_allclose(
        terms["loss_xent"],
        losses.smoothed_cross_entropy(both, np.concatenate([labels, labels]), 0.1), rtol=1e-6)
    np.testing.assert_allclose(terms["loss_lp"], 0.5 * np.mean((clean - adv) ** 2), rtol=1e-6)
    plain = objectives.alp_objective(0.1, 0.0, mixed=True).loss(mixed, labels, None)
    assert float(plain["loss_lp"]) == 0.0
    only_clean = objectives.alp_objective(0.1, 0.5, mixed=False).loss(clean, labels, None)
    assert float(only_clean["loss_lp"]) == 0.0
    acc = objectives.mixed_accuracies(mixed, labels, True)
    np.testing.assert_allclose(acc["clean_accuracy"], np.mean(clean.argmax(-1) == labels))
    np.testing.assert_allclose(acc["adv_accuracy"], np.mean(adv.argmax(-1) == labels))
    assert set(objectives.mixed_accuracies(clean, labels, False)) == {"clean_accuracy"}


def test_get_objective():
    c = helpers.digits_config()
    with pytest.raises(ValueError, match="nope"):
        objectives.get_objective(helpers.digits_config(train_objective="nope"))
    assert isinstance(objectives.get_objective(c), objectives.Objective)


# ---- loss terms -------------------------------------------------------------------------

def test_smoothed_cross_entropy_by_hand():
    logits = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], np.float32)
    labels = np.array([2, 0])
    ls = 0.1
    logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    targets = np.eye(3)[labels] * (1 - ls) + ls / 3
    want = np.mean(-np.sum(targets * logp, -1))
    np.testing.assert_allclose(losses.smoothed_cross_entropy(logits, labels, ls), want,
                               rtol=1e-6)
    np.testing.assert_allclose(losses.smoothed_cross_entropy(logits, labels, 0.0),
                               np.mean(-logp[[0, 1], labels]), rtol=1e-6)
    np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels),
                               -logp[[0, 1], labels], rtol=1e-6)
    # bfloat16 logits are computed in float32.
    assert losses.smoothed_cross_entropy(logits.astype(jnp.bfloat16), labels).dtype == jnp.float32


def test_logit_pairing_loss():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    b = np.array([[0.0, 2.0], [5.0, 1.0]], np.float32)
    np.testing.assert_allclose(losses.logit_pairing_loss(a, b, 0.5), 0.5 * (1 + 0 + 4 + 9) / 4)
    assert float(losses.logit_pairing_loss(a, b, 0.0)) == 0.0
    assert float(losses.logit_pairing_loss(a, b, -1.0)) == 0.0


def test_weight_decay_loss():
    params = {"a": {"weights": np.array([1.0, 2.0], np.float32)},
              "b": {"biases": np.array([3.0], np.float32), "gamma": np.array([[4.0]], np.float32)}}
    np.testing.assert_allclose(losses.weight_decay_loss(params, 0.1), 0.1 * (1 + 4 + 9 + 16) / 2)
    mask = {"a": {"weights": False}, "b": {"biases": True, "gamma": True}}
    np.testing.assert_allclose(losses.weight_decay_loss(params, 0.1, mask), 0.1 * (9 + 16) / 2)
    mask = {"a": {"weights": True}, "b": {"biases": False, "gamma": False}}
    np.testing.assert_allclose(losses.weight_decay_loss(params, 0.1, mask), 0.1 * (1 + 4) / 2)
    none = jax.tree_util.tree_map(lambda _: False, params)
    assert float(losses.weight_decay_loss(params, 0.1, none)) == 0.0
    assert float(losses.weight_decay_loss(params, 0.0)) == 0.0


def test_topk_correct_with_ties():
    logits = np.array([[1.0, 1.0, 0.0, 0.0],
                       [3.0, 2.0, 2.0, 1.0],
                       [3.0, 2.0, 2.0, 1.0],
                       [3.0, 2.0, 2.0, 1.0],
                       [0.0, 0.0, 0.0, 0.0],
                       [np.nan, 0.0, 0.0, 0.0],
                       [np.nan] * 4,
                       [0.0, np.inf, 0.0, 0.0]], np.float32)
    labels = np.array([1, 2, 3, 0, 3, 1, 0, 1])
    # Ties break towards the lower class index (tf.argmax, tf.nn.top_k); a row with a
    # non-finite logit is never correct (NaN used to compare its way to 100%).
    expected = {1: [False, False, False, True, False, False, False, False],
                2: [True, False, False, True, False, False, False, False],
                3: [True, True, False, True, False, False, False, False],
                4: [True, True, True, True, True, False, False, False]}
    for k, want in expected.items():
        np.testing.assert_array_equal(losses.topk_correct(logits, labels, k), want,
                                      err_msg=f"k={k}")


def test_topk_correct_matches_stable_top_k():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, (200, 10)).astype(np.float32)  # many ties
    labels = rng.integers(0, 10, 200)
    order = np.argsort(-logits, axis=-1, kind="stable")  # ties: lower index first
    for k in (1, 5):
        want = [labels[i] in order[i, :k] for i in range(200)]
        np.testing.assert_array_equal(losses.topk_correct(logits, labels, k), want)
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1),
                                  np.argmax(logits, -1) == labels)


# ---- make_train_step with plain arguments: a user's own optax optimizer ---------------------

@pytest.mark.slow
def test_custom_optax_optimizer_through_make_train_step():
    """``optax.adamw`` (its state has no ``count`` of ours, its own weight decay) drives the
    step: the first update equals adamw's update of the gradient of the step's own loss,
    computed here independently, and frozen parameters stay put whatever adamw does."""
    import optax

    model = helpers.small_model()
    variables = helpers.init_small_variables()
    # eps well above the smallest gradients: Adam's first step is g / (|g| + eps), which
    # for |g| ~ eps turns float rounding into visible differences.
    tx = optax.adamw(1e-3, eps=1e-3, weight_decay=1e-2)
    images, labels = helpers.digits_split("train")
    x, y = jnp.asarray(images[:16]), jnp.asarray(labels[:16])
    objective = objectives.make_objective("alp", "clean", label_smoothing=0.0)
    step = jax.jit(steps.make_train_step(model, tx, None, objective, "clean"))
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), helpers.IMAGE_SIZE,
                                  moving_average_decay=-1.0,
                                  variables=jax.tree_util.tree_map(jnp.copy, variables))

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                x, train=True, mutable=["batch_stats"])
        return losses.smoothed_cross_entropy(logits, y, 0.0)

    @jax.jit  # one compile instead of op-by-op dispatch of the whole network (the same math)
    def reference(params):
        grads = jax.grad(loss)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), loss(params)

    want, want_loss = reference(variables["params"])
    new, metrics = step(state, x, y)
    np.testing.assert_allclose(metrics["total_loss"], want_loss, rtol=1e-5)
    assert "learning_rate" not in metrics and "current_epoch" not in metrics
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(want),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for _ in range(2):
        new, metrics = step(new, x, y)
    assert int(new.step) == 3 and np.isfinite(metrics["total_loss"])

    # A trainable mask freezes everything outside it, even under adamw's decoupled decay.
    mask = ts.trainable_mask_fn(LOGITS_SCOPE)
    frozen = jax.jit(steps.make_train_step(model, tx, None, objective, "clean",
                                           trainable_mask=mask, weight_decay=1e-4))
    state = ts.create_train_state(model, tx, jax.random.PRNGKey(0), helpers.IMAGE_SIZE,
                                  moving_average_decay=-1.0,
                                  variables=jax.tree_util.tree_map(jnp.copy, variables))
    out, _ = frozen(state, x, y)
    before, after = _flat_params(state), _flat_params(out)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.startswith(LOGITS_SCOPE) for k in moved), sorted(moved)[:3]


@pytest.mark.slow
def test_readme_train_step_snippet_runs():
    """The README's "A train step is built from plain arguments" example, as written."""
    import os
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme) as f:
        text = f.read()
    after = text[text.index("A train step is built from plain arguments"):]
    code = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    images, labels = helpers.digits_split("train")
    scope = {"jax": jax, "images16": jnp.asarray(images[:8]), "labels": jnp.asarray(labels[:8])}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example
    metrics = scope["metrics"]
    assert int(scope["state"].step) == 1
    assert {"loss_xent", "loss_lp", "loss_wd", "adv_accuracy"} <= set(metrics)
    assert np.isfinite(metrics["total_loss"]) and metrics["loss_lp"] > 0
