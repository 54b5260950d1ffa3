# merino-pl: `make demo` runs the whole pipeline on the embedded default, `make test` the test suite.
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

.PHONY: setup demo test bench clean slurm-deps

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/merino-pl pipeline --config recipes/pipeline/cpu-demo.yaml

test: setup slurm-deps
	$(BIN)/python -m pytest -q tests

# The real-SLURM tests (tests/test_slurm.py) start a local cluster from Debian's slurm-wlm and
# munge. Installed only when missing, and only as root with apt-get (CI on this machine);
# anywhere else nothing is installed and those tests skip with the reason.
slurm-deps:
	@if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "slurm-deps: slurm-wlm/munge missing and not root with apt-get: SLURM tests will skip"; \
	else \
	  echo "slurm-deps: installing slurm-wlm and munge (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
	    || echo "slurm-deps: apt-get failed: SLURM tests will skip"; \
	fi

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
