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

The two-process cluster run of ``test_cluster.py`` (``cluster_run.py``) spends most of its
minutes waiting on gloo round trips. The run's first process (the xdist controller, or
pytest itself without xdist) starts it in the background as soon as the collected tests
include that file, and the file runs last, so the cores do other tests meanwhile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWNS_CACHE = False
_CLUSTER_ENV = "ALP_JAX_TEST_CLUSTER_RUN"  # cluster_run.ENV (importing it needs JAX)
_CLUSTER_FILE = "test_cluster.py"
_cluster: subprocess.Popen | None = None
_OWNS_CLUSTER_DIR = False


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
# this order, so the long ones start at once and the short ones fill in around them.
# test_cluster.py goes last: it reads what the background cluster run wrote.
LONGEST_FIRST = ("test_sharding.py", "test_notebook.py",
                 "test_tf_checkpoint.py", "test_programs.py", "test_robustness.py",
                 "test_attacks.py", "test_benchmarks.py", "test_custom_attack.py",
                 "test_cluster_faults.py", "test_train_step.py", "test_autoattack.py",
                 "test_install.py")


def _is_first_process(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # not an xdist worker


def pytest_configure(config: pytest.Config) -> None:
    """Names the background cluster run's directory before any xdist worker starts, so
    that the workers inherit it."""
    global _OWNS_CLUSTER_DIR
    if _is_first_process(config) and _CLUSTER_ENV not in os.environ:
        os.environ[_CLUSTER_ENV] = tempfile.mkdtemp(prefix="alp-jax-test-cluster-")
        _OWNS_CLUSTER_DIR = True


def _start_cluster_run(config: pytest.Config, test_ids: list[str]) -> None:
    """Starts cluster_run.py once, when the tests to run include test_cluster.py."""
    global _cluster
    if (_OWNS_CLUSTER_DIR and _cluster is None and not config.option.collectonly
            and any(os.path.basename(i.split("::")[0]) == _CLUSTER_FILE for i in test_ids)):
        import cluster_run

        _cluster = cluster_run.start_in_background(os.environ[_CLUSTER_ENV])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    rank[_CLUSTER_FILE] = len(rank) + 1
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable


def pytest_collection_finish(session: pytest.Session) -> None:
    """Without xdist this process runs the tests: the selection (-k, -m) is final now."""
    if _is_first_process(session.config):
        _start_cluster_run(session.config, [item.nodeid for item in session.items])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    _start_cluster_run(node.config, ids)  # the controller, once a worker has collected


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _is_first_process(config):
        return
    if _cluster is not None and _cluster.poll() is None:  # the run was cut short
        os.killpg(_cluster.pid, signal.SIGKILL)
        _cluster.wait()
    if _OWNS_CLUSTER_DIR:
        shutil.rmtree(os.environ.pop(_CLUSTER_ENV), ignore_errors=True)
    if _OWNS_CACHE:  # the process that made the directory (the run's controller)
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def small_variables():
    return helpers.init_small_variables()


@pytest.fixture(scope="session")
def trained_digits(small_variables) -> helpers.TrainedDigits:
    del small_variables  # the training starts from this (cached) initialisation
    return helpers.train_digits(150)
