# One venv, created on first use; every target below runs inside it.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= smollm2-demo

.PHONY: install test test-fast lint demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Two pytest workers: the end-to-end tests one after the other on one, the unit tests beside them on the other
# (tests/conftest.py groups them); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests collected'; exit 0; fi; exit $$rc

test-fast: install  # the unit tests: everything not marked slow (no Ray / DeepSpeed / MLflow end to end)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m 'not slow' tests

lint: install
	$(VENV)/bin/ruff check falcon feature_store pipelines jobs tests

demo: install
	$(PY) -m pipelines.demo --config $(CONFIG)

clean:
	rm -rf $(VENV) .cache runs data
