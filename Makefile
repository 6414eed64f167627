# Quickstart:  make demo       (set-up + synthetic data + 2-process training + evaluation)
#              make test       (set-up + the whole test suite; what .ci/run runs)
#              make test-fast  (the suite without multi-process, end-to-end and mxnet tests)
#              make lint       (ruff, then the import contracts of pyproject.toml)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml launch/setup_env.sh
	bash launch/setup_env.sh $(VENV)
	touch $@

demo: setup
	bash launch/demo.sh $(VENV)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not mxnet"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo

clean:
	rm -rf runs data/synthetic .pytest_cache
