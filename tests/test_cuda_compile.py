"""CUDA backend checks that need no GPU: every kernel file compiles with nvcc for sm_80 and sm_90, the
torch binding compiles against the installed (CPU) torch headers, the kernels' Philox4x32-10 dropout
masks are bit-identical to Triton's (host-compiled copy of philox.cuh vs the Triton kernels' own
``_keep`` under the interpreter), and ``backend="cuda"`` reports why it is unavailable without a GPU."""

import os
import shlex
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

import ptv2_kernels  # noqa: F401  (before triton: selects the Triton interpreter on a machine without a GPU)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from ptv2_kernels.kernels.prefix_attention_triton import _keep
from ptv2_kernels.ops import cuda_backend

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "prefix_attention"
KERNEL_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME)")


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def _cuda_include_flags() -> list:
    """The -I flags nvcc itself uses for the CUDA headers (cuda_runtime_api.h), from its dry run (nvcc
    may be a wrapper script, so its path does not locate the toolkit)."""
    _, output = _run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    line = next(line for line in output.splitlines() if line.startswith("#$ INCLUDES="))
    return shlex.split(line.split("=", 1)[1].strip().strip('"'))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every .cu (both archs in one nvcc call each) and syntax-check the binding, in parallel.
    Returns {name: (returncode, output)}."""
    out = tmp_path_factory.mktemp("cuda_objects")
    jobs = {path.name: [NVCC, "-std=c++17", "-O3", "-c", str(path), "-o", str(out / f"{path.stem}.o"), *ARCH_FLAGS]
            for path in KERNEL_FILES}
    torch_includes = include_paths()
    jobs["binding.cpp"] = ["g++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=ptv2_check",
                           *(f"-I{p}" for p in torch_includes), f"-I{sysconfig.get_paths()['include']}",
                           *_cuda_include_flags(), f"-I{CSRC}", str(CSRC / "binding.cpp")]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    return results


@needs_nvcc
@pytest.mark.parametrize("name", [p.name for p in KERNEL_FILES])
def test_kernel_compiles_for_sm80_and_sm90(compiled, name):
    code, output = compiled[name]
    assert code == 0, f"nvcc failed on {name}:\n{output}"


@needs_nvcc
def test_binding_compiles_against_cpu_torch(compiled):
    code, output = compiled["binding.cpp"]
    assert code == 0, f"g++ -fsyntax-only failed on binding.cpp:\n{output}"


def test_kernel_files_are_torch_free():
    for path in [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        text = path.read_text()
        for header in ("<torch/", "<ATen/", "<c10/"):
            assert f"#include {header}" not in text, f"{path.name} includes a torch header ({header})"


PHILOX_DRIVER = r"""
#include <cstdio>
#include "philox.cuh"
// stdin: lines "seed threshold c0 c1 c2 c3"; stdout: "word0 keep" per line.
int main() {
  unsigned long long seed; unsigned threshold, c0, c1, c2, c3;
  while (std::scanf("%llu %u %u %u %u %u", &seed, &threshold, &c0, &c1, &c2, &c3) == 6) {
    std::printf("%u %d\n", ptv2::philox_word0(seed, c0, c1, c2, c3),
                int(ptv2::dropout_keep(seed, threshold, c0, c1, c2, ptv2::RngStream(c3))));
  }
}
"""


@triton.jit
def _philox_kernel(C0, C1, C2, Word, Keep, seed, threshold, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """Word[i] = word0 of tl.random.philox(seed, C0[i], C1[i], C2[i], STREAM); Keep[i] = the Triton
    kernels' own ``_keep`` on the same counters."""
    offs = tl.arange(0, BLOCK)
    c0 = tl.load(C0 + offs)
    c1 = tl.load(C1 + offs)
    c2 = tl.load(C2 + offs)
    zero = c0.to(tl.uint32) * 0
    word, _, _, _ = tl.random.philox(seed, c0.to(tl.uint32), c1.to(tl.uint32), c2.to(tl.uint32), zero + STREAM)
    tl.store(Word + offs, word.to(tl.int64) & 0xFFFFFFFF)
    tl.store(Keep + offs, _keep(seed, c0, c1, c2.to(tl.int32), STREAM, threshold).to(tl.int32))


def _triton_philox(seed, threshold, c0, c1, c2, stream):
    """(word0, keep) from Triton for int64 counter tensors c0, c1, c2 (values < 2**31)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c0, c1, c2 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c0, c1, c2))
    word = torch.empty_like(c0)
    keep = torch.empty(c0.shape, dtype=torch.int32, device=device)
    _philox_kernel[(1,)](c0, c1, c2, word, keep, seed, threshold, STREAM=stream, BLOCK=c0.numel())
    return word.cpu(), keep.cpu()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_philox_matches_triton_bit_for_bit(tmp_path):
    source = tmp_path / "philox_driver.cpp"
    source.write_text(PHILOX_DRIVER)
    binary = tmp_path / "philox_driver"
    code, output = _run(["g++", "-std=c++17", "-O1", f"-I{CSRC}", str(source), "-o", str(binary)])
    assert code == 0, output

    gen = torch.Generator().manual_seed(0)
    n = 256
    for seed in (0, 12345, 2**32 + 7, 2**63 - 2):
        for stream, p in ((0, 0.1), (1, 0.5), (2, 0.9)):
            threshold = round(p * (1 << 24))
            # counters as the kernels use them: columns/dims, rows, b*H + h (all < 2**31)
            c0, c1, c2 = (torch.randint(0, 2**31 - 1, (n,), generator=gen) for _ in range(3))
            c0[:8] = torch.arange(8)  # small counters, as most real ones are
            word, keep = _triton_philox(seed, threshold, c0, c1, c2, stream)
            lines = "".join(f"{seed} {threshold} {a} {b} {c} {stream}\n" for a, b, c in zip(c0.tolist(), c1.tolist(),
                                                                                        c2.tolist()))
            result = subprocess.run([str(binary)], input=lines, capture_output=True, text=True, check=True)
            host = torch.tensor([[int(x) for x in line.split()] for line in result.stdout.splitlines()])
            assert torch.equal(host[:, 0], word), f"philox word0 differs (seed {seed}, stream {stream})"
            assert torch.equal(host[:, 1], keep.to(torch.int64)), f"keep mask differs (seed {seed}, stream {stream})"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_status_reports_why_unavailable():
    available, reason = cuda_backend.cuda_status()
    assert not available
    assert "backend='cuda'" in reason and ("GPU" in reason or "nvcc" in reason)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        cuda_backend.cuda_prefix_attention(*([torch.zeros(1, 1, 1, 16)] * 3), *([torch.zeros(1, 1, 1, 16)] * 2),
                                           None, None, None)
