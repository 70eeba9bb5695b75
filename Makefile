# The README's two commands. Each creates .venv when missing, installs jsparse with its C++
# (and, when nvcc is found, CUDA) extension, and runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .make-stamps
SOURCES := pyproject.toml CMakeLists.txt $(shell find xla_ffi -type f 2>/dev/null)
PYTEST_WORKERS ?= 2

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Build requirements first, then an editable install without build isolation (fast rebuilds).
$(STAMPS)/install-%: $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet "scikit-build-core>=0.10" "nanobind>=2.0" "jax>=0.10,<0.12" "jaxlib>=0.10,<0.12"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[$*]"
	@mkdir -p $(STAMPS) && touch $@

demo: $(STAMPS)/install-demo
	$(BIN)/jsparse demo

test: $(STAMPS)/install-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

lint: $(STAMPS)/install-test
	$(BIN)/python -m ruff check jsparse tests benchmarks
	$(BIN)/python -m ruff format --check jsparse tests benchmarks

clean:
	rm -rf build $(STAMPS) jsparse/_ffi_*.so
