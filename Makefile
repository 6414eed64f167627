# Quickstart:  make demo   (set-up + synthetic data + 2-process training + evaluation)
#              make test   (set-up + the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml launch/setup_env.sh
	bash launch/setup_env.sh $(VENV)
	touch $@

demo: setup
	bash launch/demo.sh $(VENV)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs data/synthetic .pytest_cache
