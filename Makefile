# The README's two commands. Each creates .venv when missing, installs jsparse with its C++
# (and, when nvcc is found, CUDA) extension, and runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .make-stamps
SOURCES := pyproject.toml CMakeLists.txt $(shell find xla_ffi -type f 2>/dev/null)
PYTEST_WORKERS ?= 2

.PHONY: demo test test-spconv lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Build requirements first, then an editable install without build isolation (fast rebuilds).
$(STAMPS)/install-%: $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet "scikit-build-core>=0.11" "nanobind>=2.0" "jax>=0.10,<0.12" "jaxlib>=0.10,<0.12"
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[$*]"
	@mkdir -p $(STAMPS) && touch $@

demo: $(STAMPS)/install-demo
	$(BIN)/jsparse demo

test: $(STAMPS)/install-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

# The oracle tests against spconv 2.3.8 (marker spconv; `make test` skips them where spconv is missing).
# torch 2.13.0 (CPU) and spconv are installed once; JSPARSE_REQUIRE_SPCONV=1 makes a failed import of
# either fail the tests instead of skipping them.
$(STAMPS)/spconv: $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0" "spconv==2.3.8"
	@mkdir -p $(STAMPS) && touch $@

test-spconv: $(STAMPS)/install-test $(STAMPS)/spconv
	JSPARSE_REQUIRE_SPCONV=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m spconv

lint: $(STAMPS)/install-test
	$(BIN)/python -m ruff check jsparse tests benchmarks
	$(BIN)/python -m ruff format --check jsparse tests benchmarks

clean:
	rm -rf build $(STAMPS) jsparse/_ffi_*.so
