"""The core library, the programs and the digits pipeline work without TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys

import helpers
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = helpers.import_blocker("tensorflow", "tensorflow_datasets") + r"""
import jax, jax.numpy as jnp
import alp_jax
from alp_jax import (checkpoints, config, data, eval, losses, model, objectives, pgd,
                     sharding, slim_names, steps, summaries, train, train_state)
m = model.resnet_v2_small(10)
v = jax.jit(lambda k: m.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(jax.random.PRNGKey(0))
b = next(data.train_iterator("digits", None, 8, 4))
adv = pgd.generate_adversarial_examples(lambda x: m.apply(v, x, train=False),
                                        jnp.asarray(b["images"]), jax.random.PRNGKey(1),
                                        "pgd_16_2_1")
assert adv.shape == b["images"].shape
try:
    data.num_examples("tiny_imagenet", "train", "/nonexistent")
    raise AssertionError("expected an error naming the missing TensorFlow")
except ModuleNotFoundError as e:
    assert "pip install -e '.[data]'" in str(e), e
assert not any(k.startswith("tensorflow") for k in sys.modules)
print("OK")
"""


@pytest.mark.slow
def test_core_imports_and_runs_without_tensorflow():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=helpers.program_env(None),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK")
