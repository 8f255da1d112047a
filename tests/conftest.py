"""Session fixtures shared by the test files (built from ``tests/helpers.py``).

- ``small_variables``: one fresh initialisation of the small model (compiled once).
- ``trained_digits``: the small model trained for 150 steps of the default recipe on
  clean 16x16 digits (about 95% validation accuracy), reused by the attack and train-step
  tests instead of retraining in each.
"""

from __future__ import annotations

import helpers
import pytest


@pytest.fixture(scope="session")
def small_variables():
    return helpers.init_small_variables()


@pytest.fixture(scope="session")
def trained_digits(small_variables) -> helpers.TrainedDigits:
    del small_variables  # the training starts from this (cached) initialisation
    return helpers.train_digits(150)
