# Two entry points, each creating .venv and installing what it needs:
#   make demo   trains and attacks a baseline and an ALP model on digits (CPU, minutes)
#   make test   installs the test extras (TensorFlow for the data and parity tests) and
#               runs ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed-core

demo: $(VENV)/.installed-core
	$(PY) -m alp_jax.demo --output_dir=demo_out

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint
	$(PY) -m pytest -q -ra --durations=15 tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) demo_out
