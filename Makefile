# expblip: two commands on a fresh machine
#   make demo   creates the environment, runs the tiny synthetic-face pipeline (Ray Train + ZeRO-3, 2 CPU workers)
#   make test   creates the environment and runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::DeprecationWarning
# DeepSpeed's CPU accelerator only where there is no NVIDIA GPU: training refuses DS_ACCELERATOR=cpu beside CUDA
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
export DS_ACCELERATOR ?= cpu
endif
export RAY_AUTH_MODE ?= disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup system-deps demo test test-engines test-fast lint mlflow clean

setup: $(STAMP)

# Debian packages the tests use: Chromium for the browser test (skipped, with a reason, where it cannot be installed)
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium fonts-dejavu-core >/dev/null) || echo "note: chromium not installed; the browser test will skip"; }

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --disable-pip-version-check -e ".[test]"
	@# byte-compile on every core (pip compiles on one); machines with PYTHONDONTWRITEBYTECODE never write .pyc later
	-$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib >/dev/null
	touch $(STAMP)

demo: setup
	$(BIN)/python launch/pipeline.py --recipe demo

# Two pytest workers, a whole test module each at a time (module fixtures train once): most tests leave a core idle
# (one rank, Ray start-up, waits on a server), so the suite takes about half the time on 2 cores
XDIST ?= -n 2 --dist loadfile

test: setup system-deps
	$(BIN)/python -m pytest -q $(XDIST) --durations=15 -m "not engines"

# outside engines, each in a venv of its own made once in ~/.cache/expblip: vLLM parity (tests/test_vllm.py: vLLM's CPU
# build, 3.1 GB) and transformers' image-text-to-text pipeline on a Qwen2.5-VL export (tests/test_hf_pipeline.py: torch
# and torchvision builds that import together, 5.4 GB)
test-engines: setup
	$(BIN)/python -m pytest -q -m engines

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

lint: setup
	$(BIN)/ruff check .

mlflow: setup
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db \
		--artifacts-destination $(CURDIR)/runs/mlflow-artifacts --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf runs demo .pytest_cache
