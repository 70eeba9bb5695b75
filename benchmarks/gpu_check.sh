#!/usr/bin/env bash
# The CUDA check, as one call on a machine with an NVIDIA GPU and jax with CUDA (the device machines'
# image has jax 0.11 with its CUDA 13 plugin, flax, optax, pytest, hypothesis, nanobind and
# scikit-build-core; nothing is downloaded). In at most 8 minutes:
#   1. builds jsparse with its CUDA extension for this GPU's architecture (JSPARSE_CUDA=ON: a missing
#      nvcc or a compile error stops here);
#   2. prints build_info() and runs the GPU tests: every FFI-versus-reference equivalence and
#      determinism test parametrized over platforms, on CUDA (tests/ops, tests/utils, `-k cuda`);
#   3. runs benchmarks/bench_gpu.py (maps, layers, VoxelResBackBone8x, train step; against the
#      reference path, a dense matmul and the copy bandwidth measured in the same run).
# Usage: benchmarks/gpu_check.sh [python]   (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
export PYTHONUNBUFFERED=1 JSPARSE_CUDA=ON
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }

step "GPU"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
nvcc --version | tail -1

step "build (sm_${arch})"
timeout 330 "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps --no-index -e . \
  --config-settings=build-dir=build/gpu \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="${arch}-real" \
  --config-settings=cmake.build-type=Release
"$PYTHON" - <<'PY'
import json, jax, jsparse
info = jsparse.build_info()
print(json.dumps({k: info[k] for k in ("cpu_ffi", "cuda_ffi", "jax_version", "jax_platform")}))
missing = sorted(set(jsparse._ffi.TARGETS) - set(info["ffi_targets"]["cuda"]))
print("CUDA targets missing:", missing or "none")
assert info["cuda_ffi"] and jax.default_backend() == "gpu", "no CUDA kernels or no GPU backend"
PY

step "GPU tests"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -n 4 tests/ops tests/utils -k cuda \
  || echo "GPU TESTS FAILED (exit $?)"

step "GPU benchmark"
timeout 240 "$PYTHON" benchmarks/bench_gpu.py --repeats 10 || echo "BENCHMARK FAILED (exit $?)"
step "done"
