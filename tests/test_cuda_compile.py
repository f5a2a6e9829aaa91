"""CUDA backend checks that need no GPU: every kernel file compiles with nvcc for sm_80 and sm_90, the
torch binding compiles against the installed (CPU) torch headers, the kernels' Philox4x32-10 dropout
masks (RNG contract v2) are bit-identical to Triton's (host-compiled copy of philox.cuh vs tl.random.philox and
the Triton kernels' own attention keep tile and prefix keep bitmask under the interpreter), and
``backend="cuda"`` reports why it is unavailable without a GPU."""

import os
import shlex
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.cpp_extension import include_paths

import ptv2_kernels  # noqa: F401  (before triton: selects the Triton interpreter on a machine without a GPU)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from ptv2_kernels.kernels.prefix_attention_triton import _attention_keep, prefix_dropout_mask_kernel
from ptv2_kernels.build_spec import cuda_spec
from ptv2_kernels.ops import cuda_backend
from ptv2_kernels.ops.common import Dropout, Options

CSRC = cuda_spec().directory()
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
// stdin: lines "seed threshold x c1 c2 stream"; stdout: the four words of counter (x >> 2, c1, c2, stream) and
// the contract-v2 keep decision of element x.
int main() {
  unsigned long long seed; unsigned threshold, x, c1, c2, stream;
  while (std::scanf("%llu %u %u %u %u %u", &seed, &threshold, &x, &c1, &c2, &stream) == 6) {
    unsigned w[4];
    ptv2::philox4(seed, x >> 2, c1, c2, stream, w);
    std::printf("%u %u %u %u %d\n", w[0], w[1], w[2], w[3],
                int(ptv2::dropout_keep(seed, threshold, x, c1, c2, ptv2::RngStream(stream))));
  }
}
"""


@triton.jit
def _philox_words_kernel(C0, C1, C2, Words, seed, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """Words[i, w] = word w of tl.random.philox(seed, C0[i], C1[i], C2[i], STREAM)."""
    offs = tl.arange(0, BLOCK)
    c0 = tl.load(C0 + offs).to(tl.uint32)
    zero = c0 * 0
    c1 = tl.load(C1 + offs).to(tl.uint32)
    words = tl.random.philox(seed, c0, c1, tl.load(C2 + offs).to(tl.uint32), zero + STREAM)
    for w in tl.static_range(4):
        tl.store(Words + offs * 4 + w, words[w].to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _attention_keep_kernel(Keep, seed, row0, col0, bh, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The Triton kernels' own attention keep tile (``_attention_keep``) of rows row0 .., joint columns col0 .."""
    rows = row0 + tl.arange(0, BLOCK_M)
    keep = _attention_keep(seed, rows, col0, bh, threshold, BLOCK_M, BLOCK_N)
    tl.store(Keep + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], keep.to(tl.int32))


def _host_philox(binary, rows):
    """Host-compiled philox.cuh on ``rows`` of (seed, threshold, x, c1, c2, stream): int64 [n, 5] (words, keep)."""
    lines = "".join(" ".join(map(str, row)) + "\n" for row in rows)
    result = subprocess.run([str(binary)], input=lines, capture_output=True, text=True, check=True)
    return torch.tensor([[int(v) for v in line.split()] for line in result.stdout.splitlines()])


@pytest.fixture(scope="module")
def philox_binary(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    tmp = tmp_path_factory.mktemp("philox")
    (tmp / "philox_driver.cpp").write_text(PHILOX_DRIVER)
    code, output = _run(["g++", "-std=c++17", "-O1", f"-I{CSRC}", str(tmp / "philox_driver.cpp"), "-o",
                         str(tmp / "philox_driver")])
    assert code == 0, output
    return tmp / "philox_driver"


SEEDS = (0, 12345, 2**32 + 7, 2**63 - 2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_philox_words_match_triton_bit_for_bit(philox_binary):
    """All four output words of philox.cuh equal tl.random.philox's, over small and large counters."""
    gen = torch.Generator().manual_seed(0)
    n = 128
    for seed in SEEDS:
        for stream in (0, 1, 2):
            # c0 = x >> 2 of a 32-bit element index x; c1, c2 (rows, b*H + h) up to 2**31
            c0, c1, c2 = (torch.randint(0, 2**high - 1, (n,), generator=gen) for high in (30, 31, 31))
            c0[:8] = torch.arange(8)  # small counters, as most real ones are
            words = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
            _philox_words_kernel[(1,)](c0.to(DEVICE), c1.to(DEVICE), c2.to(DEVICE), words, seed, STREAM=stream,
                                       BLOCK=n)
            host = _host_philox(philox_binary, [(seed, 0, 4 * a, b, c, stream) for a, b, c in
                                                zip(c0.tolist(), c1.tolist(), c2.tolist())])
            assert torch.equal(host[:, :4], words.cpu()), f"philox words differ (seed {seed}, stream {stream})"


def test_attention_keep_matches_the_triton_kernels(philox_binary):
    """philox.cuh's contract-v2 keep decisions equal the Triton kernels' attention-dropout tile (4 columns per
    Philox call), including large row/column/batch-head counters."""
    tiles = [(0, 0, 0), (37, 64, 5), (2**20 + 3, 2**24, 777), (2**30, 2**28 + 4, 2**30)]  # (row0, col0, b*H + h)
    for seed, (row0, col0, bh), p in zip(SEEDS, tiles, (0.1, 0.5, 0.9, 0.3)):
        threshold = round(p * (1 << 24))
        keep = torch.empty(16, 32, dtype=torch.int32, device=DEVICE)
        _attention_keep_kernel[(1,)](keep, seed, row0, col0, bh, threshold, BLOCK_M=16, BLOCK_N=32)
        host = _host_philox(philox_binary, [(seed, threshold, col0 + c, row0 + r, bh, 0) for r in range(16)
                                            for c in range(32)])
        assert torch.equal(host[:, 4].view(16, 32), keep.cpu().to(torch.int64)), f"attention keep differs (seed {seed})"


def test_prefix_keep_bits_match_the_triton_kernels(philox_binary):
    """philox.cuh's keep decisions for prefix keys (stream 1) and values (stream 2) equal the bits the Triton
    kernels' prefix_dropout_mask_kernel packs (bit d % 32 of word d // 32)."""
    rows, num_prefix, words, seed, p = 3, 5, 2, 2**40 + 11, 0.25
    threshold = round(p * (1 << 24))
    bits = torch.empty(2, rows, num_prefix, words, dtype=torch.int32, device=DEVICE)
    prefix_dropout_mask_kernel[(2 * rows * 1,)](bits, seed, threshold, rows, num_prefix, WORDS=words, BLOCK_P=8)
    dims = torch.arange(32 * words)
    got = (bits.cpu().to(torch.int64)[..., dims // 32] >> (dims % 32)) & 1  # [2, rows, P, 64]
    host = _host_philox(philox_binary, [(seed, threshold, d, j, bh, kv + 1) for kv in range(2) for bh in range(rows)
                                        for j in range(num_prefix) for d in range(32 * words)])
    assert torch.equal(host[:, 4].view(2, rows, num_prefix, 32 * words), got)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_status_reports_why_unavailable():
    available, reason = cuda_backend.cuda_status()
    assert not available
    assert "backend='cuda'" in reason and ("GPU" in reason or "nvcc" in reason)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        cuda_backend.cuda_forward(*([torch.zeros(1, 1, 1, 16)] * 3), *([torch.zeros(1, 1, 1, 16)] * 2),
                                  None, None, None, None, None, Options(1.0, Dropout()))
