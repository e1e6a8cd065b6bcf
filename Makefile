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
	rm -f .hypothesis/errors.txt && mkdir -p .hypothesis
	EXPANDCTL_RECORD_ERRORS=$(CURDIR)/.hypothesis/errors.txt $(BIN)/python -m pytest -q -n 2 \
		--hypothesis-profile=deep --hypothesis-show-statistics tests/test_properties.py | grep -E "passing|passed|failed"
	@$(BIN)/python -c "import sys; e=[float(l) for l in open('.hypothesis/errors.txt')]; \
		print(f'{len(e)} comparisons, worst relative error {max(e):.3g}')"

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

bench: $(STAMP)
	OMP_NUM_THREADS= MKL_NUM_THREADS= $(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
