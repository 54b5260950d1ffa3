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

.PHONY: setup demo test lint bench clean slurm-deps gptq-env executorch-env litgpt-env

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/merino-pl pipeline --config recipes/pipeline/cpu-demo.yaml

# pytest-xdist workers: the tests are single-threaded (OMP_NUM_THREADS=1), so one per core; the SLURM /
# DDP tests share one worker (tests/conftest.py). 2 cores: 13 min instead of 20.
TEST_WORKERS ?= 2
test: lint slurm-deps gptq-env executorch-env
	MERINO_REQUIRE_GPTQ=1 MERINO_GPTQ_PYTHON=$(GPTQ_VENV)/bin/python \
	MERINO_REQUIRE_EXECUTORCH=1 MERINO_EXECUTORCH_PYTHON=$(EXECUTORCH_VENV)/bin/python \
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

# ruff (pinned in the dev extra) over everything Python: lint rules and formatting as pyproject.toml says
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# A user's environment without merino-pl, for tests/test_export.py's INT4 consumer: the CPU torch,
# this venv's transformers and pyproject's `gptq` extra (optimum + GPTQModel), in a venv of its own
# (GPTQModel's torchao would slow and clutter every transformers import in .venv). ~2 min, 1.6 GB.
# `make test` requires it (MERINO_REQUIRE_GPTQ=1); a bare pytest skips that test without it.
GPTQ_VENV  ?= $(VENV)/gptq
GPTQ_STAMP := $(GPTQ_VENV)/.installed
export GPTQMODEL_CPU_WORKERS ?= 2
gptq-env: $(GPTQ_STAMP)

$(GPTQ_STAMP): pyproject.toml Makefile | $(STAMP)
	test -x $(GPTQ_VENV)/bin/python || $(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPTQ_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" $$($(BIN)/python -c "$$GPTQ_REQUIREMENTS")
	touch $(GPTQ_STAMP)

# the pins, read from the installed merino-pl's metadata (pyproject.toml is their one source)
define GPTQ_REQUIREMENTS
import importlib.metadata as md, transformers
extra = [r.split(";")[0].replace(" ", "") for r in md.requires("merino-pl") if 'extra == "gptq"' in r]
print(" ".join([f"transformers=={transformers.__version__}", *extra]))
endef
export GPTQ_REQUIREMENTS

# ExecuTorch (`merino-pl export --executorch`, `generate --runtime executorch`; tests/test_executorch.py):
# the same CPU torch, .venv's transformers, merino-pl itself (editable) and pyproject's `executorch`
# extra, in a venv of its own: executorch pulls torchao (CUDA-library warnings on import, like
# GPTQModel's), coremltools, pandas and scikit-learn, none of which .venv needs. 2 min (19 on busy cores), 1.7 GB.
# `make test` requires it (MERINO_REQUIRE_EXECUTORCH=1); a bare pytest skips those tests without it.
EXECUTORCH_VENV  ?= $(VENV)/executorch
EXECUTORCH_STAMP := $(EXECUTORCH_VENV)/.installed
executorch-env: $(EXECUTORCH_STAMP)

$(EXECUTORCH_STAMP): pyproject.toml Makefile | $(STAMP)
	test -x $(EXECUTORCH_VENV)/bin/python || $(PYTHON) -m venv $(EXECUTORCH_VENV)
	$(EXECUTORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(EXECUTORCH_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" \
	  "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')" -e ".[executorch]"
	touch $(EXECUTORCH_STAMP)

# LitGPT, the peer trainer of bench/time_to_quality.py (its system (c), bench/peers/litgpt_peer.py):
# the CPU torch and `litgpt` in a venv of its own, since LitGPT 0.5 pins jsonargparse <= 4.41 and
# huggingface-hub < 1.4, which clash with .venv's; `requests` too, which LitGPT's checkpoint saver
# imports (through jsonargparse) without declaring it. 1 min, 1.1 GB.
# Not part of `make test`; bench/time_to_quality.py builds it when its `litgpt` system runs.
LITGPT_VENV  ?= $(VENV)/litgpt
LITGPT_STAMP := $(LITGPT_VENV)/.installed
LITGPT       ?= litgpt==0.5.13
litgpt-env: $(LITGPT_STAMP)

$(LITGPT_STAMP): Makefile
	test -x $(LITGPT_VENV)/bin/python || $(PYTHON) -m venv $(LITGPT_VENV)
	$(LITGPT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LITGPT_VENV)/bin/python -m pip install -q "$(TORCH_CPU)" "$(LITGPT)" requests
	touch $(LITGPT_STAMP)

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

# the CPU benches (bench/gpu.py needs a CUDA GPU; bench/executorch_agreement.py a trained checkpoint and
# .venv/executorch, as bench/latency.py --deploy does: docs/latency.md)
BENCHES := search data data_startup fit eval quantize qlinear latency fast_path startup latency_kit time_to_quality
bench: setup
	for b in $(BENCHES); do $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
