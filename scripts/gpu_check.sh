#!/usr/bin/env bash
# The GPU pass in one command (run it on a CUDA machine from the repository root):
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. the whole test suite on the GPU (Triton compiled, bf16/fp16 with real tensor cores, large shapes),
# 2. compute-sanitizer memcheck and racecheck on the fused kernels for a few shapes,
# 3. the benchmark of fused vs concatenation, written to OUT_DIR (default benchmarks/results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"

PTV2_TEST_DEVICE=cuda python -m pytest -q tests 2>&1 | tee "$out/tests.log"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 python scripts/sanitizer_driver.py 2>&1 | tail -5 | tee "$out/sanitizer-$tool.log"
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$out/sanitizer.log"
fi

python -m ptv2_kernels.bench --mode all --device cuda --out "$out" 2>&1 | tee "$out/bench.log"
