# merino-pl: `make demo` runs the main job on the embedded default, `make test` the test suite.
# Both set up .venv first (idempotent). The CPU build of torch is pinned here only; the project
# itself accepts any torch >= 2.4 so GPU clusters keep their CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/merino-pl demo

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
