"""Kernel cases of ``ptv2-bench`` (forward and forward+backward per provider) under pytest-benchmark;
each benchmarked call's results are checked against ``concat-sdpa`` first."""

import pytest
import torch

from ptv2_kernels.bench import kernel
from ptv2_kernels.bench.configs import relative_attention

from conftest import bench_sizes

SIZES = bench_sizes()


@pytest.mark.parametrize("seq, prefix", SIZES.cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("provider", kernel.PROVIDERS)
@pytest.mark.parametrize("bench", kernel.BENCHES)
def test_kernel(benchmark, bench, provider, seq, prefix, device, model_shape):
    model, heads, dim = model_shape
    reason = kernel.skip_reason(provider, bench, device, relative=relative_attention(model) is not None)
    if reason:
        pytest.skip(reason)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = kernel.KernelCase(model, SIZES.batch, heads, seq, prefix, dim, dtype, device)
    x = kernel.make_inputs(case, requires_grad=bench == "kernel-fwdbwd")
    call, checked = kernel.make_call(provider, x, bench == "kernel-fwdbwd")
    err = kernel.max_error(checked(call()), kernel.reference_outputs(case, bench), x.mask)
    assert err <= kernel.TOLERANCE[dtype], f"{provider} disagrees with concat-sdpa: {err:.3g}"

    def synced():
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    benchmark.extra_info.update(model=model, B=case.batch, H=heads, N=seq, P=prefix, D=dim, dtype=str(dtype))
    benchmark.pedantic(synced, warmup_rounds=SIZES.warmup, rounds=SIZES.repeats)
