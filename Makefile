# Two entry points, each creating .venv and installing what it needs:
#   make demo   trains and attacks a baseline and an ALP model on digits (CPU, minutes)
#   make test   installs the test extras (TensorFlow for the data and parity tests) and
#               runs ruff and the whole test suite (what CI runs)
#   make test-fast  the same without the slow tests (the inner loop, a few minutes)
#   make test-lower  the tests (not the slow ones) in $(LOWER_VENV), with the oldest
#               supported JAX stack (constraints-lower.txt); not part of `make test`
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
LOWER_VENV ?= .venv-lower
LOWER_PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-fast test-lower lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# pip byte-compiles what it installs on one core (about a minute for the test extras);
# compileall then does it on every core. (Not byte-compiling at all is slower in the end:
# where PYTHONDONTWRITEBYTECODE is set, every process would compile jax and TensorFlow from
# source at each import.) Like pip, a file that does not compile is left as it is.
COMPILE := $(PY) -m compileall -q -j 0
SITE_PACKAGES = $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

$(VENV)/.installed-core: pyproject.toml | $(PY)
	$(PIP) --no-compile -e .
	$(COMPILE) "$(SITE_PACKAGES)" > /dev/null || true
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) --no-compile -e '.[test]'
	$(COMPILE) "$(SITE_PACKAGES)" > /dev/null || true
	touch $@ $(VENV)/.installed-core

demo: $(VENV)/.installed-core
	$(PY) -m alp_jax.demo --output_dir=demo_out

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

# Two pytest-xdist workers: XLA compiles on one thread, so two workers keep both cores of
# a small machine busy. --dist loadfile gives each worker whole files, so a file's module
# fixtures (a trained model, one shared cluster run) are built once; conftest.py orders
# the longest files first. (pytest-xdist 3.8's loadgroup does not group under pytest 9.2:
# its xdist_group suffix no longer reaches the node id.) PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra --durations=25 -n $(PYTEST_WORKERS) --dist loadfile \
	--no-loadscope-reorder
# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint
	$(PYTEST) tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-fast: lint
	$(PYTEST) -m "not slow" tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# The lower bounds of pyproject.toml's JAX stack, installed exactly; the rest resolves to
# the newest releases that fit them.
test-lower:
	test -x $(LOWER_VENV)/bin/python || $(PYTHON) -m venv $(LOWER_VENV)
	$(LOWER_VENV)/bin/python -m pip install -q --disable-pip-version-check \
	  -c constraints-lower.txt -e '.[test]'
	$(LOWER_VENV)/bin/python -c "import jax, flax, optax, orbax.checkpoint as o; \
	  print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
	$(LOWER_VENV)/bin/python -m pytest -q -ra $(LOWER_PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) $(LOWER_VENV) demo_out
