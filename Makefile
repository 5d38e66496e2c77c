# ipex-lars: the commands a newcomer needs.
#   make train            set up the default stack and run the main job (digits recipe)
#   make test             set up the stack and run the test suite
#   make test STACK=native
#   make lint             ruff's checks and format check (CI runs them)
STACK ?= ipex
VENV  := .venv-$(STACK)
PY    := $(VENV)/bin/python

.PHONY: setup train test lint experiment bench-optim bench-comm bench-launch bench-train doctor clean

setup:
	@bash env/setup.sh $(STACK)

train: setup
	$(VENV)/bin/ipex-lars train --recipe digits --resume auto $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

experiment: setup
	$(VENV)/bin/ipex-lars experiment large-batch

bench-optim: setup
	$(VENV)/bin/ipex-lars bench optimizer

bench-comm: setup
	$(VENV)/bin/ipex-lars bench comm

bench-launch: setup
	$(VENV)/bin/ipex-lars bench launch

bench-train: setup
	$(VENV)/bin/ipex-lars bench train $(BENCH_ARGS)

doctor: setup
	$(VENV)/bin/ipex-lars doctor

clean:
	rm -rf build .pytest_cache
