"""Timing, peak memory and the SPEC §4 roofline of one benchmarked call.

Time: on a GPU ``triton.testing.do_bench`` (CUDA events, median after warm-up); on the CPU
``time.perf_counter`` around each of ``repeats`` calls after ``warmup`` calls, median.

Peak memory is the most memory the call needed on top of what was allocated before it (inputs, model
weights), in MiB. GPU: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call.
CPU: the rise of the process's resident set (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` before the call). For this to follow tensors closely, glibc's
mmap threshold is pinned at 128 KiB (every larger buffer is mmapped and unmapped when freed) and freed
heap is trimmed before each measurement. Unavailable (None) off Linux.
"""

import ctypes
import gc
import statistics
import time
from typing import Callable, Optional

import torch

H100_BYTES_PER_S = 3.0e12
H100_FLOPS_PER_S = 800e12
BACKWARD_FLOP_FACTOR = 2.5
_M_MMAP_THRESHOLD = -3


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


class _CpuRss:
    """Peak resident-set rise of this process during a call (see the module docstring)."""

    def __init__(self):
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = True
        except OSError:
            self.available = False

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def run(self, fn):
        gc.collect()
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = self._status_mb("VmRSS")
        out = fn()
        return out, self._status_mb("VmHWM") - base


_cpu_rss: Optional[_CpuRss] = None


def peak_mb(fn: Callable[[], object], device: torch.device):
    """(what ``fn`` returned, peak MiB it needed above the memory held before it, or None)."""
    global _cpu_rss
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if _cpu_rss is None:
        _cpu_rss = _CpuRss()
    if not _cpu_rss.available:
        return fn(), None
    return _cpu_rss.run(fn)


def attention_flops(batch: int, heads: int, seq: int, prefix: int, dim: int, backward: bool) -> float:
    """SPEC §4: 4·B·H·N·(N+P)·D forward, 2.5× that more for the backward."""
    forward = 4.0 * batch * heads * seq * (seq + prefix) * dim
    return forward * (1 + BACKWARD_FLOP_FACTOR) if backward else forward


def attention_bytes(batch: int, heads: int, seq: int, prefix: int, dim: int, itemsize: int, backward: bool) -> float:
    """Least traffic of a fused kernel: forward reads q, k, v and the compact prefix and writes the output;
    the backward also reads the output and its gradient and writes dq, dk, dv and the prefix gradients."""
    seq_elems, prefix_elems = batch * heads * seq * dim, heads * prefix * dim
    forward = 4 * seq_elems + 2 * prefix_elems
    backward = 8 * seq_elems + 4 * prefix_elems if backward else 0
    return float(forward + backward) * itemsize


def roofline(flops: float, nbytes: float, ms: float, device: torch.device):
    """(TFLOP/s, fraction of the H100 floor max(bytes / 3 TB/s, FLOPs / 800 TFLOP/s) reached); both
    None on the CPU, where the H100 floor means nothing."""
    if device.type != "cuda":
        return None, None
    floor_s = max(nbytes / H100_BYTES_PER_S, flops / H100_FLOPS_PER_S)
    return flops / (ms * 1e-3) / 1e12, floor_s / (ms * 1e-3)
