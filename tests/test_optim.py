"""TF1 optimizers, learning-rate schedules and moving averages (alp_jax.train_state).

The references are NumPy (float64) transcriptions of TF1's update equations:

- RMSPropOptimizer: ms starts at ones; ms = d*ms + (1-d)*g^2;
  mom = m*mom + lr*g/sqrt(ms + eps); var -= mom.
- MomentumOptimizer: acc = m*acc + g; var -= lr*acc.
- AdamOptimizer: t = k+1; lr_t = lr*sqrt(1-b2^t)/(1-b1^t); m = b1*m + (1-b1)*g;
  v = b2*v + (1-b2)*g^2; var -= lr_t*m/(sqrt(v) + eps).
- ExponentialMovingAverage(decay, num_updates=step): d = min(decay, (1+step)/(10+step));
  shadow -= (1-d)*(shadow - var).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alp_jax import train_state as ts
from alp_jax.config import default_config

# ---- a toy problem: a weighted quadratic over a few parameter arrays --------------------

_RNG = np.random.RandomState(0)
INIT = {"conv": {"weights": _RNG.normal(size=(2, 3)), "biases": _RNG.normal(size=(3,))},
        "gamma": _RNG.uniform(0.5, 2.0, size=(4,))}
TARGET = jax.tree_util.tree_map(lambda x: _RNG.normal(size=x.shape), INIT)
SCALE = jax.tree_util.tree_map(lambda x: _RNG.uniform(0.5, 3.0, size=x.shape), INIT)


def _grads(params):
    """Gradient of sum(scale * (p - target)^2): works on NumPy and JAX leaves alike."""
    return jax.tree_util.tree_map(lambda p, t, s: 2 * s * (p - t), params, TARGET, SCALE)


def _as_jax(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _run_optax(tx, num_steps):
    params = _as_jax(INIT)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(_grads(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(num_steps):
        params, state = step(params, state)
    return params


def _run_numpy(update, slots, num_steps, lr_fn):
    """Applies ``update(name, var, grad, slots_for_var, lr, t) -> new var`` leaf by leaf."""
    params = _flat(INIT)
    for t in range(num_steps):
        grads = _flat(_grads(_unflat(params)))
        for name in params:
            params[name] = update(params[name], grads[name], slots[name], lr_fn(t), t)
    return _unflat(params)


def _flat(tree):
    return {"/".join(k.key for k in path): np.array(v, np.float64)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat):
    out: dict = {}
    for name, v in flat.items():
        *scopes, leaf = name.split("/")
        d = out
        for s in scopes:
            d = d.setdefault(s, {})
        d[leaf] = v
    return out


def _assert_tree_close(ours, ref, rtol=2e-5, atol=1e-6):
    for name, want in _flat(ref).items():
        np.testing.assert_allclose(_flat(ours)[name], want, rtol=rtol, atol=atol, err_msg=name)


def _np_rmsprop(decay, momentum, eps):
    def update(var, g, s, lr, t):
        s.setdefault("ms", np.ones_like(var))
        s.setdefault("mom", np.zeros_like(var))
        s["ms"] = decay * s["ms"] + (1 - decay) * g * g
        s["mom"] = momentum * s["mom"] + lr * g / np.sqrt(s["ms"] + eps)
        return var - s["mom"]
    return update


def _np_momentum(momentum):
    def update(var, g, s, lr, t):
        s["acc"] = momentum * s.get("acc", np.zeros_like(var)) + g
        return var - lr * s["acc"]
    return update


def _np_adam(b1=0.9, b2=0.999, eps=1e-8):
    def update(var, g, s, lr, t):
        m = b1 * s.get("m", np.zeros_like(var)) + (1 - b1) * g
        v = b2 * s.get("v", np.zeros_like(var)) + (1 - b2) * g * g
        s["m"], s["v"] = m, v
        k = t + 1
        lr_t = lr * np.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        return var - lr_t * m / (np.sqrt(v) + eps)
    return update


def _fresh_slots():
    return {name: {} for name in _flat(INIT)}


# A staircase drop mid-run: decay_steps = int(1.5 * 2.0) = 3, so steps 0-2 use lr, 3-5
# lr*0.5 and 6-7 lr*0.25.
LR, FACTOR, NUM_STEPS = 0.05, 0.5, 8
SCHEDULE = ts.make_schedule("exp_decay", LR, 1.5, lr_decay_factor=FACTOR,
                            lr_num_epochs_per_decay=2.0)
LR_FN = lambda t: LR * FACTOR ** (t // 3)


def test_staircase_schedule_used_by_the_optimizer_tests():
    assert [float(SCHEDULE(t)) for t in range(NUM_STEPS)] == pytest.approx(
        [LR_FN(t) for t in range(NUM_STEPS)])


@pytest.mark.parametrize("decay,momentum,eps", [(0.9, 0.9, 1.0), (0.8, 0.5, 1e-3)])
def test_tf1_rmsprop_matches_tf1_equations(decay, momentum, eps):
    ours = _run_optax(ts.tf1_rmsprop(SCHEDULE, decay, momentum, eps), NUM_STEPS)
    ref = _run_numpy(_np_rmsprop(decay, momentum, eps), _fresh_slots(), NUM_STEPS, LR_FN)
    _assert_tree_close(ours, ref)
    # Not optax's RMSProp (ms from zeros, epsilon outside the root): this is a real check.
    other = _run_optax(optax.rmsprop(LR, decay, eps, momentum=momentum), NUM_STEPS)
    assert not np.allclose(_flat(other)["gamma"], _flat(ref)["gamma"], rtol=1e-3)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_tf1_momentum_matches_tf1_equations(momentum):
    ours = _run_optax(ts.tf1_momentum(SCHEDULE, momentum), NUM_STEPS)
    ref = _run_numpy(_np_momentum(momentum), _fresh_slots(), NUM_STEPS, LR_FN)
    _assert_tree_close(ours, ref)


@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.5, 0.9, 0.3)])
def test_tf1_adam_matches_tf1_equations(b1, b2, eps):
    # A large epsilon tells "sqrt(v) + eps" (TF1's epsilon-hat) from "sqrt(v + eps)".
    ours = _run_optax(ts.tf1_adam(SCHEDULE, b1, b2, eps), NUM_STEPS)
    ref = _run_numpy(_np_adam(b1, b2, eps), _fresh_slots(), NUM_STEPS, LR_FN)
    _assert_tree_close(ours, ref)


def test_make_optimizer_names():
    for name, ref in (("rms", _np_rmsprop(0.7, 0.3, 0.5)), ("momentum", _np_momentum(0.3)),
                      ("adam", _np_adam())):
        tx = ts.make_optimizer(name, SCHEDULE, momentum=0.3, rmsprop_decay=0.7,
                               rmsprop_epsilon=0.5)
        _assert_tree_close(_run_optax(tx, 4), _run_numpy(ref, _fresh_slots(), 4, LR_FN))
    with pytest.raises(ValueError, match="sgd"):
        ts.make_optimizer("sgd", SCHEDULE)


@pytest.mark.parametrize("name", ["rms", "momentum", "adam"])
def test_trainable_mask_freezes_the_rest(name):
    mask = {"conv": {"weights": False, "biases": True}, "gamma": False}
    full = _run_optax(ts.make_optimizer(name, SCHEDULE), 5)
    for m in (mask, lambda params: mask):
        ours = _run_optax(ts.make_optimizer(name, SCHEDULE, trainable_mask=m), 5)
        np.testing.assert_array_equal(ours["conv"]["weights"],
                                      np.float32(INIT["conv"]["weights"]))
        np.testing.assert_array_equal(ours["gamma"], np.float32(INIT["gamma"]))
        # The trainable leaf moves exactly as without a mask (per-leaf optimizers).
        np.testing.assert_allclose(ours["conv"]["biases"], full["conv"]["biases"], rtol=1e-6)
        assert not np.allclose(ours["conv"]["biases"], INIT["conv"]["biases"])


def test_trainable_mask_fn_from_scopes():
    params = {"net": {"logits": {"weights": 1.0, "biases": 2.0}, "logits2": {"w": 3.0},
                      "postnorm": {"gamma": 4.0}}}
    fn = ts.trainable_mask_fn("net/logits, net/postnorm")
    assert fn(params) == {"net": {"logits": {"weights": True, "biases": True},
                                  "logits2": {"w": False}, "postnorm": {"gamma": True}}}
    assert ts.trainable_mask_fn("") is None and ts.trainable_mask_fn(None) is None


# ---- schedules --------------------------------------------------------------------------

def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_exp_decay_boundaries():
    # decay_steps = int(10.7 * 2.0) = 21 (truncated, as the original's int()).
    s = ts.make_schedule("exp_decay", 0.1, 10.7, lr_decay_factor=0.5,
                         lr_num_epochs_per_decay=2.0)
    assert _values(s, [0, 20, 21, 41, 42, 63]) == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.0125], rel=1e-6)
    # With the original's defaults.
    s = ts.make_schedule("exp_decay", 0.045, 1000.0)
    assert _values(s, [1999, 2000, 10000]) == pytest.approx(
        [0.045, 0.045 * 0.94, 0.045 * 0.94 ** 5], rel=1e-6)
    # Works traced (inside a jitted step).
    assert float(jax.jit(s)(jnp.int32(2000))) == pytest.approx(0.045 * 0.94, rel=1e-6)


def test_step_schedule_is_piecewise_constant():
    # Boundaries int(e * 10): 10, 25 and 40; a boundary step keeps the earlier value.
    s = ts.make_schedule("step", 99.0, 10.0, lr_list=[0.3, 0.2, 0.1, 0.05],
                         lr_decay_epochs=[1, 2.5, 4])
    assert _values(s, [0, 10, 11, 25, 26, 40, 41, 10**6]) == pytest.approx(
        [0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05])
    c = default_config()
    s = ts.make_schedule("step", c.learning_rate, 100.0, lr_list=c.lr_list,
                         lr_decay_epochs=c.lr_decay_epochs)
    assert _values(s, [0, 100, 101, 500, 501, 9000, 9001]) == pytest.approx(
        [1 / 6, 1 / 6, 2 / 6, 5 / 6, 1.0, 0.001, 0.0001])
    with pytest.raises(ValueError, match="one more value"):
        ts.make_schedule("step", 0.1, 10.0, lr_list=[0.1, 0.2], lr_decay_epochs=[1, 2])


def test_fixed_schedule_and_unknown_names():
    s = ts.make_schedule("fixed", 0.01, 10.0)
    assert _values(s, [0, 1, 10**6]) == pytest.approx([0.01] * 3)
    with pytest.raises(ValueError, match="cosine"):
        ts.make_schedule("cosine", 0.1, 10.0)


@pytest.mark.parametrize("name", ["exp_decay", "step", "fixed"])
def test_num_replicas_scaling(name):
    kw = dict(lr_decay_factor=0.5, lr_num_epochs_per_decay=1.0, lr_list=[0.2, 0.1],
              lr_decay_epochs=[1])
    one = ts.make_schedule(name, 0.2, 10.0, **kw)
    four = ts.make_schedule(name, 0.2, 10.0, num_replicas=4, **kw)
    steps = [0, 9, 10, 11, 25]
    assert _values(four, steps) == pytest.approx([4 * v for v in _values(one, steps)])
    assert ts.steps_per_epoch(1000, 10, 4) == 25.0


def test_optimizer_from_config():
    c = default_config()
    c.num_replicas = 2
    c.batch_size = 10
    c.lr_num_epochs_per_decay = 1.0
    # steps_per_epoch = 1000 / 10 / 2 = 50: decay every 50 steps, lr doubled.
    _, schedule = ts.optimizer_from_config(c, 1000)
    assert _values(schedule, [0, 49, 50]) == pytest.approx(
        [0.09, 0.09, 0.09 * 0.94], rel=1e-6)


# ---- moving averages --------------------------------------------------------------------

def test_ema_decay():
    assert _values(lambda s: ts.ema_decay(0.9999, s), [0, 1, 8, 1000, 10**6]) == pytest.approx(
        [1 / 10, 2 / 11, 9 / 18, 1001 / 1010, 0.9999], rel=1e-6)
    assert float(ts.ema_decay(0.5, 100)) == pytest.approx(0.5)


def test_ema_update_matches_numpy():
    rng = np.random.RandomState(1)
    values = [{"a": rng.normal(size=3), "b": {"c": rng.normal(size=(2, 2))}} for _ in range(6)]
    avg_np = jax.tree_util.tree_map(np.array, values[0])
    avg = _as_jax(values[0])
    for step, new in enumerate(values[1:], start=1):
        d = min(0.99, (1 + step) / (10 + step))
        avg_np = jax.tree_util.tree_map(lambda s, v, d=d: s - (1 - d) * (s - v), avg_np, new)
        avg = ts.ema_update(avg, _as_jax(new), ts.ema_decay(0.99, step))
    _assert_tree_close(avg, avg_np, rtol=1e-5)
    assert not np.allclose(avg["a"], values[-1]["a"])
