# The README's two commands. Each creates .venv when missing, installs jsparse with its C++
# (and, when nvcc is found, CUDA) extension, and runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .make-stamps
SOURCES := pyproject.toml CMakeLists.txt $(shell find xla_ffi -type f 2>/dev/null)
PYTEST_WORKERS ?= 2

.PHONY: demo test test-spconv test-sanitize lint clean

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

# The kernel tests on a CPU extension built with AddressSanitizer and UndefinedBehaviorSanitizer (-O1 -g1)
# in build/sanitize; .venv's extension is left as it is. The sitecustomize.py written there makes Python
# import jsparse._ffi_cpu from build/sanitize (checked before the tests), and the sanitizer runtimes are
# preloaded into the uninstrumented interpreter. A report aborts its process, failing the test, and the
# target fails on any report in the output (build/sanitize/pytest.log): pytest captures sys.stderr only,
# so that the reports reach it (the UBSan runtime ignores log_path next to ASan). Leaks are not checked:
# CPython and XLA keep memory until exit.
SANITIZE := build/sanitize
SANITIZE_CXX ?= g++
SANITIZE_FLAGS := -g1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
# The FFI half of the op tests, 4 hypothesis examples each. Left out: the reference backend's half, the
# slow and spconv tests, and those of rows past 2**31 elements (GBs, which ASan's shadow and copies grow).
SANITIZE_TESTS := -m "not spconv and not slow" -k "not [reference and not rows_past_int32" \
  tests/ops tests/utils/test_voxelize.py
SANITIZE_RUNTIMES = $(foreach r,asan ubsan,$$($(SANITIZE_CXX) -print-file-name=lib$(r).so))
SANITIZE_ENV = PYTHONPATH=$(abspath $(SANITIZE)) LD_PRELOAD="$(SANITIZE_RUNTIMES)" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

define SANITIZE_SITECUSTOMIZE
"""Written by `make test-sanitize`: imports jsparse._ffi_cpu from this folder (the sanitized build)."""

import importlib.util
import pathlib
import sys

_EXTENSION = next(pathlib.Path(__file__).parent.glob("_ffi_cpu.*.so"))


class _SanitizedExtension:
  @staticmethod
  def find_spec(name, path=None, target=None):
    return importlib.util.spec_from_file_location(name, _EXTENSION) if name == "jsparse._ffi_cpu" else None


sys.meta_path.insert(0, _SanitizedExtension)  # ahead of the editable install's finder
endef
export SANITIZE_SITECUSTOMIZE

test-sanitize: SHELL := /bin/bash
test-sanitize: $(STAMPS)/install-test
	cmake -S . -B $(SANITIZE) -DJSPARSE_CUDA=OFF -DJSPARSE_OPT_LEVEL=-O1 -DCMAKE_CXX_COMPILER=$(SANITIZE_CXX) \
	  -DCMAKE_CXX_FLAGS="$(SANITIZE_FLAGS)" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
	  -DPython_EXECUTABLE=$(abspath $(BIN)/python) > /dev/null
	cmake --build $(SANITIZE) --target _ffi_cpu --parallel $$(nproc)
	nm -D $(SANITIZE)/_ffi_cpu.*.so | grep -q __asan_report
	nm -D $(SANITIZE)/_ffi_cpu.*.so | grep -q __ubsan_handle
	printf '%s\n' "$$SANITIZE_SITECUSTOMIZE" > $(SANITIZE)/sitecustomize.py
	$(SANITIZE_ENV) $(BIN)/python -c "import pathlib, jsparse._ffi as f; m = f._extension('cpu'); \
	  assert pathlib.Path(m.__file__).parent == pathlib.Path('$(SANITIZE)').resolve(), m.__file__; \
	  print('sanitized:', m.__file__)"
	set -o pipefail; $(SANITIZE_ENV) JSPARSE_HYPOTHESIS_EXAMPLES=4 \
	  $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q --capture=sys $(SANITIZE_TESTS) 2>&1 \
	  | tee $(SANITIZE)/pytest.log
	@! grep -qE "ERROR: AddressSanitizer|runtime error:" $(SANITIZE)/pytest.log \
	  || { echo "sanitizer reports in $(SANITIZE)/pytest.log" >&2; exit 1; }

lint: $(STAMPS)/install-test
	$(BIN)/python -m ruff check jsparse tests benchmarks
	$(BIN)/python -m ruff format --check jsparse tests benchmarks

clean:
	rm -rf build $(STAMPS) jsparse/_ffi_*.so
