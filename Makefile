# The README's commands. `make run` installs what it needs, then runs the demo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the CPU build of torch that lies on this machine's disk; the vllm extra brings its own
TORCH_PIN ?= torch==2.13.0

.PHONY: install run test test-slow lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[serve,slurm,optuna,joblib,dev]"
	touch $@

run: install
	$(BIN)/python run.py $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # layers and no import cycles (.importlinter)

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
