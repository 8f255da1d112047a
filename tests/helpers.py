"""Helpers shared by the core-library tests: the small model, digits configs, training.

Test modules import this as ``import helpers`` (pytest puts ``tests/`` on ``sys.path``).
``conftest.py`` builds the session fixtures from these helpers; other test files may call
them directly, e.g. ``helpers.train(config, model, state, 10)``.

Model initialisation is the slowest thing on CPU (XLA compiles every random initializer:
over ten seconds for the small model), so ``init_small_variables`` compiles the init once
per process and every caller reuses it; the variable shapes do not depend on the image
size, so one initialisation serves every input size.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alp_jax import steps
from alp_jax import train_state as ts
from alp_jax.config import default_config
from alp_jax.data import digits
from alp_jax.model import ResNetV2, resnet_v2_small

IMAGE_SIZE = 16
NUM_CLASSES = 10
BATCH_SIZE = 32
# A few hundred steps are too few for TF-slim's 0.997: let the BatchNorm statistics settle.
BN_DECAY = 0.9
SMALL_SCOPE = "resnet_v2_small"


def small_model(**kwargs: Any) -> ResNetV2:
    """``resnet_v2_small`` for 10 digit classes (``kwargs``: dtype, bn_group_size, ...)."""
    kwargs.setdefault("bn_decay", BN_DECAY)
    return resnet_v2_small(NUM_CLASSES, **kwargs)


@functools.lru_cache(maxsize=1)
def _jit_small_init() -> Callable[[jax.Array], dict[str, Any]]:
    model = small_model()
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    return jax.jit(lambda key: model.init(key, x, train=False))


@functools.lru_cache(maxsize=4)
def init_small_variables(seed: int = 0) -> dict[str, Any]:
    """Fresh ``{'params', 'batch_stats'}`` of ``small_model()`` (one compile per process)."""
    return _jit_small_init()(jax.random.PRNGKey(seed))


def digits_split(split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 16, 16, 3] in [-1, 1], labels [N]) of a digits split."""
    return digits.load_split(split, IMAGE_SIZE)


def digits_config(**overrides: Any) -> ml_collections.ConfigDict:
    """``default_config()`` for the small model on 16x16 digits, batch 32, plus overrides.

    Only what the defaults leave to the dataset (classes, epoch size) and the model choice
    are filled in; everything else keeps the original's defaults (RMSProp, lr 0.045,
    exp_decay, weight decay 1e-4, label smoothing 0.1, clean training).
    """
    c = default_config()
    c.dataset = "digits"
    c.dataset_image_size = IMAGE_SIZE
    c.model_name = SMALL_SCOPE
    c.num_classes = NUM_CLASSES
    c.examples_per_epoch = digits.num_examples("train")
    c.bn_decay = BN_DECAY
    c.batch_size = BATCH_SIZE
    for k, v in overrides.items():
        c[k] = v
    return c


def new_state(config: ml_collections.ConfigDict, model: ResNetV2,
              variables: dict[str, Any] | None = None, seed: int = 0) -> ts.TrainState:
    """A TrainState for ``config`` from ``variables`` (default: the shared fresh init)."""
    tx, _ = ts.optimizer_from_config(config, config.examples_per_epoch)
    if variables is None:
        variables = init_small_variables(seed)
    return ts.create_train_state(model, tx, jax.random.PRNGKey(seed), IMAGE_SIZE,
                                 moving_average_decay=config.moving_average_decay,
                                 variables=variables)


@dataclasses.dataclass
class CountedStep:
    """A jitted train step that counts how often JAX traces it (a Python side effect)."""

    fn: Callable[..., Any]
    traces: int = 0

    @classmethod
    def build(cls, config: ml_collections.ConfigDict, model: ResNetV2) -> CountedStep:
        raw = steps.train_step_from_config(config, model)
        counted = cls(fn=lambda *a: None)

        def traced(*args):
            counted.traces += 1
            return raw(*args)

        counted.fn = jax.jit(traced)
        return counted

    def __call__(self, *args):
        return self.fn(*args)


def train(step: Callable[..., Any], state: ts.TrainState, num_steps: int, *, seed: int = 0,
          start_step: int = 0) -> tuple[ts.TrainState, list[dict[str, float]]]:
    """``num_steps`` steps on digits batches; returns the state and per-step metrics."""
    it = digits.train_iterator(IMAGE_SIZE, BATCH_SIZE, seed=seed, start_step=start_step)
    history = []
    for _ in range(num_steps):
        batch = next(it)
        state, metrics = step(state, batch["images"], batch["labels"])
        history.append(metrics)
    history = [{k: np.asarray(v) for k, v in m.items()} for m in jax.device_get(history)]
    return state, history


def inference_fn(model: ResNetV2) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
    """Jitted inference-mode logits ``(variables, images) -> logits``."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def accuracy(logits: Any, labels: Any) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


@dataclasses.dataclass
class TrainedDigits:
    """The session's small model trained on clean digits (see ``conftest.trained_digits``)."""

    config: ml_collections.ConfigDict
    model: ResNetV2
    step: CountedStep
    state: ts.TrainState
    history: list[dict[str, float]]
    logits: Callable[[dict[str, Any], jax.Array], jax.Array]
    val_images: np.ndarray
    val_labels: np.ndarray
    clean_accuracy: float

    @property
    def variables(self) -> dict[str, Any]:
        """The trained (not averaged) variables."""
        return self.state.variables(use_ema=False)


def train_digits(num_steps: int = 150) -> TrainedDigits:
    """Trains ``small_model()`` on clean 16x16 digits with the default (RMSProp) recipe."""
    config = digits_config()
    model = small_model()
    step = CountedStep.build(config, model)
    state, history = train(step, new_state(config, model), num_steps)
    logits = inference_fn(model)
    val_images, val_labels = digits_split("validation")
    acc = accuracy(logits(state.variables(), val_images), val_labels)
    return TrainedDigits(config, model, step, state, history, logits, val_images, val_labels,
                         acc)


def tree_allclose(a: Any, b: Any, **kwargs: Any) -> bool:
    """Same structure and every leaf close."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.allclose(np.asarray(x), np.asarray(y), **kwargs)
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                               strict=True))


def import_blocker(*packages: str) -> str:
    """Python source that makes importing any of ``packages`` (or their submodules) fail,
    to put in front of a ``python -c`` script: the machine-without-X case, for real."""
    return f"""
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {tuple(packages)!r}:
            raise ImportError(f"blocked: {{name}}")
        return None

sys.meta_path.insert(0, _Block())
"""


# Programs a test launches train, evaluate or attack for a few steps on tiny data, so nearly
# all of their time is XLA compiling; with LLVM's backend optimisation off they compile in
# about half the time (the same HLO, so the same computations; only the machine code is less
# optimised, and mul-adds are not fused into FMAs). Measured 2026-12-07: a robustness run's
# six attack programs compiled in 7.1 s instead of 14.9 s. The tests' own processes keep
# XLA's default: their attack loops and ResNet-v2-50 run long enough to need optimised code
# (at level 0, test_attacks.py took 376 CPU-s instead of 95, test_tf_checkpoint.py 371
# instead of 114). ALP_JAX_TEST_PROGRAM_OPT=2 launches the programs at XLA's default too.
PROGRAM_BACKEND_OPT = os.environ.get("ALP_JAX_TEST_PROGRAM_OPT", "0")


def program_env(devices: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment of a program a test launches: unbuffered output, the programs'
    backend optimisation level (``PROGRAM_BACKEND_OPT``), ``devices`` forced CPU devices
    (``None``: as this process has them) and ``extra`` variables, over this process's."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    flags = [f"--xla_backend_optimization_level={PROGRAM_BACKEND_OPT}", env.get("XLA_FLAGS", "")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    return env


def cluster_priority() -> None:
    """``preexec_fn`` of each process of a JAX cluster a test launches: a higher scheduling
    priority than the rest of the suite where this user may raise one (root; elsewhere
    nothing changes). Each of a train step's ~53 gloo all-reduces waits until the peer
    process runs, and gloo's TCP loop polls while it waits, so a busy pytest-xdist worker
    beside a cluster costs the cluster CPU as well as time. Measured 2026-12-07 on the
    2-core machine, 200 steps of the shipped ``digits_alp`` at 8px on two processes with a
    busy-looping process beside them: 2.3 steps/s and 82 CPU-s on process 0 at equal
    priority; 2.8 steps/s and 46 CPU-s 10 nice levels apart, 3.1 and 39 at 19 (alone: 4.8
    and 34). What the processes compute does not change."""
    try:
        os.nice(-19)
    except PermissionError:
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a test cluster's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
