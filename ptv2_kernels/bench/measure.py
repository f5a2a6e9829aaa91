"""Timing, peak memory and the SPEC §4 roofline of one benchmarked call.

Time (:func:`timings`): the providers of one case are timed interleaved, ``rounds`` rounds that each visit
every provider in turn, so that a disturbance (other work on a shared machine) hits them alike; each round
is one well-kept measurement, ``torch.utils.benchmark.Timer.blocked_autorange`` on the CPU (blocks of calls
sized to the timer's resolution, at the process's thread count) and ``triton.testing.do_bench`` (CUDA
events, L2 flushed) on a GPU. Reported: the median over the rounds and their range (the spread).
``cpu_time=True`` times the calling thread's CPU time (``time.thread_time``) instead of the wall clock: the
host cost of a single-threaded call, unaffected by other processes waiting for the cores.

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
from typing import Callable, Dict, NamedTuple, Optional

import torch

H100_BYTES_PER_S = 3.0e12
H100_FLOPS_PER_S = 800e12
BACKWARD_FLOP_FACTOR = 2.5
_M_MMAP_THRESHOLD = -3


class Timing(NamedTuple):
    """Milliseconds per call: median over the rounds, and the fastest and slowest round's median."""

    ms: float
    low_ms: float
    high_ms: float

    @property
    def spread(self) -> float:
        """Half the range of the rounds relative to the median (0.05: within about +-5%)."""
        return (self.high_ms - self.low_ms) / 2 / self.ms


MIN_RUN_TIME = 0.2  # seconds per round and provider on the CPU


def _round_ms(fn: Callable[[], object], device: torch.device, cpu_time: bool) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    from torch.utils import benchmark

    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                            timer=time.thread_time if cpu_time else time.perf_counter)
    return timer.blocked_autorange(min_run_time=MIN_RUN_TIME).median * 1e3


def timings(calls: Dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int,
            cpu_time: bool = False) -> Dict[str, Timing]:
    """:class:`Timing` of each call of ``calls`` (name -> call), interleaved over ``rounds`` rounds after
    ``warmup`` untimed calls of each (see the module docstring)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(_round_ms(fn, device, cpu_time))
    return {name: Timing(statistics.median(s), min(s), max(s)) for name, s in samples.items()}


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call of ``fn`` (:func:`timings` of it alone, ``repeats`` rounds)."""
    return timings({"fn": fn}, device, warmup, repeats)["fn"].ms


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
