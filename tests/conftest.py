"""Session fixtures shared by the test files (built from ``tests/helpers.py``), and the
run's shared XLA compilation cache.

- ``small_variables``: one fresh initialisation of the small model (compiled once).
- ``trained_digits``: the small model trained for 150 steps of the default recipe on
  clean 16x16 digits (about 95% validation accuracy), reused by the attack and train-step
  tests instead of retraining in each.

Most of the suite's time on CPU is XLA compiling the same few computations again: every
program a test launches compiles the same train step, and each pytest-xdist worker
compiles the same fixtures. JAX's persistent compilation cache lets every process of one
test run (pytest, its workers and the programs they launch, which inherit the
environment) compile each computation once. The directory is new for every run and
removed at its end, so a run proves what it proved without the cache: the same
computations run, only their compilation is shared. ``ALP_JAX_TEST_XLA_CACHE=DIR`` keeps
a cache across runs instead (the inner loop), ``ALP_JAX_TEST_XLA_CACHE=off`` turns it off.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWNS_CACHE = False


def _share_compilation_cache() -> None:
    """Points this process and everything it starts at one compilation cache (set before
    JAX is imported: JAX reads these variables when it starts)."""
    global _OWNS_CACHE
    choice = os.environ.get("ALP_JAX_TEST_XLA_CACHE", "")
    if choice == "off" or _CACHE_ENV in os.environ:  # off, or a worker of a run that has one
        return
    if choice:
        os.makedirs(choice, exist_ok=True)
        os.environ[_CACHE_ENV] = choice
    else:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="alp-jax-test-xla-")
        _OWNS_CACHE = True
    # Cache every computation: the tests' small models compile in under JAX's default
    # one-second threshold, and there are thousands of them.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_compilation_cache()

import helpers  # noqa: E402 (imports JAX, which reads the cache settings above)
import pytest  # noqa: E402

# The longest files first (measured with --durations=0 on the 2-core machine): under
# `--dist loadfile --no-loadscope-reorder` (Makefile) the two workers take whole files in
# this order, so the long ones start at once and the short ones fill in around them. A
# long file left out runs in name order at the end, one worker idle beside it (2026-12-07:
# test_run_guarantees.py, 131 s, ran last while the other worker sat idle for 113 s).
LONGEST_FIRST = ("test_cluster.py", "test_sharding.py", "test_notebook.py",
                 "test_tf_checkpoint.py", "test_programs.py", "test_run_guarantees.py",
                 "test_robustness.py", "test_attacks.py", "test_benchmarks.py",
                 "test_custom_attack.py", "test_cluster_faults.py", "test_train_step.py",
                 "test_autoattack.py", "test_install.py", "test_objectives.py",
                 "test_pgd.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_unconfigure(config: pytest.Config) -> None:
    del config
    if _OWNS_CACHE:  # the process that made the directory (the run's controller)
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def small_variables():
    return helpers.init_small_variables()


@pytest.fixture(scope="session")
def trained_digits(small_variables) -> helpers.TrainedDigits:
    del small_variables  # the training starts from this (cached) initialisation
    return helpers.train_digits(150)
