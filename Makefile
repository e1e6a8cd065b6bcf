# Two entry points: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pinned: these wheels are on this machine's disk; other versions would download gigabytes.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Side-by-side test workers each get one thread (two threads per process stall on 2 cores).
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: test test-deep demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check expandctl tests examples benchmarks

test: lint
	$(BIN)/python -m pytest -q -n 2 --hypothesis-profile=ci

test-deep: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --hypothesis-profile=deep tests/test_properties.py

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

bench: $(STAMP)
	OMP_NUM_THREADS= MKL_NUM_THREADS= $(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
