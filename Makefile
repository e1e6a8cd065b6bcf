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

.PHONY: test test-deep demo lint bench clean data figures figures-report reproduce

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check expandctl tests examples benchmarks
	$(BIN)/ruff format --check expandctl tests examples benchmarks

test: lint
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --hypothesis-profile=ci

test-deep: $(STAMP)
	rm -f .hypothesis/errors.txt && mkdir -p .hypothesis
	EXPANDCTL_RECORD_ERRORS=$(CURDIR)/.hypothesis/errors.txt $(BIN)/python -m pytest -q -n 2 \
		--hypothesis-profile=deep --hypothesis-show-statistics tests/test_properties.py tests/test_branches.py -k "not cli and not resume" | grep -E "passing|passed|failed"
	@$(BIN)/python -c "import sys; e=[float(l) for l in open('.hypothesis/errors.txt')]; \
		print(f'{len(e)} comparisons, worst relative error {max(e):.3g}')"

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

# Fashion-MNIST (Debian's package, else a download into the data cache, else one line saying what to do).
data: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/data.sh

# Every figure and table of results/figures: finished runs (committed) are reused, missing ones are
# trained by JOBS processes of one thread each, resumably (docs/evidence.md: what is still missing and
# its cost). `make figures-report` only rewrites the tables and figures from the run files (seconds).
JOBS ?= 2
FIGURES_OUT ?= results/figures
figures: $(STAMP)
	@for i in $$(seq 2 $(JOBS)); do $(BIN)/python examples/figures.py --out $(FIGURES_OUT) --no-report & done; \
	$(BIN)/python examples/figures.py --out $(FIGURES_OUT) --no-report; status=$$?; wait; \
	[ $$status = 0 ] && $(BIN)/python examples/figures.py --out $(FIGURES_OUT) --report-only

figures-report: $(STAMP)
	$(BIN)/python examples/figures.py --out $(FIGURES_OUT) --report-only

# The SmallNet table of results/fashion (the paper's Table 1 setting on Fashion-MNIST, 5 seeds).
REPRODUCE := --data fashion-mnist --variants compact,fc,cl,cl+fc,ck,ck+fc --seeds 0,1,2,3,4 \
	--epochs 12 --train-subset 10000 --val-subset 2000 --threads 1 --out results/fashion
reproduce: data
	$(BIN)/python examples/reproduce.py $(REPRODUCE) --kernels 3,9 & \
	$(BIN)/python examples/reproduce.py $(REPRODUCE) --kernels 5,7; status=$$?; wait; exit $$status

bench: $(STAMP)
	OMP_NUM_THREADS= MKL_NUM_THREADS= $(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
