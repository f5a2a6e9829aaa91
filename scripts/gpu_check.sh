#!/usr/bin/env bash
# The GPU pass in one command (from the repository root, on a CUDA machine; nvcc for the CUDA backend):
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. builds the CUDA backend (JIT with ninja; its log path is printed if the build fails),
# 2. runs the whole test suite on the GPU (PTV2_TEST_DEVICE=cuda: Triton compiled, bf16/fp16 on tensor
#    cores, larger shapes, the CUDA backend against float64 and against Triton),
# 3. runs compute-sanitizer memcheck and racecheck on both fused backends for a few shapes,
# 4. runs ptv2-bench --mode all (JSON, Markdown, plots if matplotlib is installed), and the DeBERTa-v3-base
#    benchmark of issue 4 (B=32, N=256, P=64, bf16; c2p/p2c in the Triton kernels vs concatenation).
# Every step runs even if an earlier one failed; logs go to OUT_DIR (default benchmarks/results/gpu) and
# the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure
  local name="$1"
  shift
  echo "== $name"
  "$@" 2>&1 | tee "$out/$name.log" || failed+=("$name")
}

step device python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
step cuda-build python -c "
from ptv2_kernels.ops.cuda_backend import cuda_status
ok, why = cuda_status()
print('cuda backend:', ok, why)
assert ok, why"
step tests env PTV2_TEST_DEVICE=cuda python -m pytest -q tests
for backend in triton cuda; do
  for tool in memcheck racecheck; do
    if command -v compute-sanitizer >/dev/null; then
      step "sanitizer-$tool-$backend" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        python scripts/sanitizer_driver.py "$backend"
    fi
  done
done
step bench python -m ptv2_kernels.bench --mode all --device cuda --out "$out"
step bench-deberta python -m ptv2_kernels.bench --mode all --device cuda --model deberta-v3-base -B 32 -N 256 \
  -P 64 --out "$out/deberta-v3-base"

if ((${#failed[@]})); then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
