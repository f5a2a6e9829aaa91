#!/usr/bin/env bash
# The CUDA backend's GPU pass in one command (from the repository root, on a CUDA machine with nvcc):
#   bash scripts/gpu_check_cuda.sh [OUT_DIR]
# 1. builds the extension (JIT, ninja; log path printed on failure) for this GPU,
# 2. runs the no-GPU checks and the GPU tests of the CUDA backend (parity vs float64 and Triton, grads,
#    dropout masks, deterministic reduction),
# 3. runs compute-sanitizer memcheck and racecheck on scripts/cuda_sanitizer_driver.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu-cuda}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"

python -c "
from ptv2_kernels.ops.cuda_backend import cuda_status
ok, why = cuda_status()
print('cuda backend:', ok, why)
assert ok, why
" 2>&1 | tee "$out/build.log"

python -m pytest -q tests/test_cuda_compile.py tests/test_cuda_backend.py 2>&1 | tee "$out/tests.log"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 python scripts/cuda_sanitizer_driver.py 2>&1 \
      | tail -20 | tee "$out/sanitizer-$tool.log"
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$out/sanitizer.log"
fi
