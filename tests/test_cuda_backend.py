"""backend="cuda" on a GPU: the hand-written CUDA kernels against the float64 reference and against the
Triton backend (same Options, so the same dropout masks), outputs and all five gradients, over odd N,
P = 0, P > N, padding, fully padded rows, banks, strided inputs, head dims 16..128 and every dtype.
Skipped without a CUDA GPU; run by scripts/gpu_check.sh."""

import math

import pytest
import torch

from ptv2_kernels.ops.common import Dropout, Options
from ptv2_kernels.ops.cuda_backend import cuda_status
from ptv2_kernels.ops.library import attend

from .reference import dropout_masks_v2, reference_attention
from .test_prefix_attention import FLOOR, max_abs, real_rows
from .test_prefix_attention import GRID as SHARED_GRID
from .test_prefix_attention import make_inputs as shared_make_inputs
from .test_prefix_attention import run_with_grads as run_function_with_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
GRID = SHARED_GRID + [
    pytest.param(2, 3, 150, 70, 128, None, ((1, 100),), id="D=128-multi-tile"),
    pytest.param(2, 2, 130, 129, 64, 2, ((0, 64),), id="bank-D=64-long"),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_inputs(batch, heads, seq, num_prefix, dim, dtype, tasks, padded_rows, seed=0):
    """The shared test inputs on the GPU, the prefix as the ``[T, H, P, D]`` bank the Functions take."""
    tensors, mask, task_ids, d_out = shared_make_inputs(batch, heads, seq, num_prefix, dim, dtype, tasks=tasks,
                                                        padded_rows=padded_rows, seed=seed, device="cuda")
    if tasks is None:
        tensors[3:] = [t.unsqueeze(0) for t in tensors[3:]]
    return tensors, mask, task_ids, d_out


def run_with_grads(backend, tensors, mask, task_ids, d_out, options, packed=False):
    """``[out, dq, dk, dv, dprefix_k, dprefix_v]`` of the registered op on ``backend`` ("cuda" or "triton")."""
    def call(*t):
        return attend(backend, *t, mask, task_ids, None, None, None, None, None, options)
    return run_function_with_grads(call, tensors, d_out, packed=packed)


def reference_with_grads(tensors, mask, task_ids, d_out, options):
    """The float64 reference on the CPU, with the kernels' dropout masks of ``options``."""
    q, k, v, prefix_k, prefix_v = (t.detach().cpu().double().requires_grad_() for t in tensors)
    batch, heads, seq, dim = q.shape
    drop = options.dropout
    attn_keep, keep_k, keep_v = dropout_masks_v2(drop.seed, batch, heads, seq, prefix_k.shape[2], dim, drop.p,
                                                     drop.prefix_p)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    pk, pv = (prefix_k, prefix_v) if task_ids is not None else (prefix_k[0], prefix_v[0])
    out = reference_attention(q, k, v, pk, pv, cpu(mask), cpu(task_ids), options.scale, attn_keep, keep_k, keep_v,
                              drop.p, drop.prefix_p)
    out.backward(d_out.cpu().double())
    return [out.detach()] + [t.grad for t in (q, k, v, prefix_k, prefix_v)]


def options_for(dim, p=0.0, prefix_p=0.0, seed=1234, deterministic=False, scale=None):
    return Options(scale=scale or 1 / math.sqrt(dim), dropout=Dropout(p, prefix_p, seed), deterministic=deterministic)


def assert_cuda_matches(tensors, mask, task_ids, d_out, options, packed=True):
    """CUDA vs float64: error at most 2x Triton's error (same inputs, same masks) plus the dtype floor."""
    got = run_with_grads("cuda", tensors, mask, task_ids, d_out, options, packed)
    triton = run_with_grads("triton", tensors, mask, task_ids, d_out, options, packed)
    ref = reference_with_grads(tensors, mask, task_ids, d_out, options)
    floor = FLOOR[tensors[0].dtype]
    for name, g, t, r in zip(NAMES, got, triton, ref):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if name == "out":  # padded query rows: any finite value (the Triton kernels write 0)
            g, t, r = (real_rows(x.cpu(), mask) for x in (g, t, r))
        err, triton_err = max_abs(g.cpu().double() - r), max_abs(t.cpu().double() - r)
        assert err <= 2 * triton_err + floor, f"{name}: error {err:.3g} vs triton {triton_err:.3g} (+{floor})"
    return got


def test_extension_builds():
    available, reason = cuda_status()
    assert available, reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,seq,num_prefix,dim,tasks,padded_rows", GRID)
def test_matches_reference_and_triton(dtype, batch, heads, seq, num_prefix, dim, tasks, padded_rows):
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, dtype, tasks, padded_rows)
    assert_cuda_matches(tensors, mask, task_ids, d_out, options_for(dim))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,prefix_p", [(0.1, 0.0), (0.0, 0.2), (0.3, 0.1)])
def test_dropout_masks_match_triton(dtype, p, prefix_p):
    """Same seed, same masks: both backends agree with the reference that applies the contract's masks."""
    tensors, mask, task_ids, d_out = make_inputs(3, 2, 45, 19, 64, dtype, 2, ((1, 30),), seed=3)
    assert_cuda_matches(tensors, mask, task_ids, d_out, options_for(64, p, prefix_p, seed=2**40 + 17))


def test_custom_scale_contiguous_inputs():
    tensors, mask, task_ids, d_out = make_inputs(2, 1, 33, 17, 128, torch.bfloat16, None, ((0, 30),), seed=2)
    assert_cuda_matches(tensors, mask, task_ids, d_out, options_for(128, scale=0.3), packed=False)


def test_output_is_stored_as_bnhd():
    tensors, mask, task_ids, _ = make_inputs(2, 3, 9, 4, 64, torch.float16, None, ())
    out = attend("cuda", *tensors, mask, task_ids, None, None, None, None, None, options_for(64))
    assert out.shape == (2, 3, 9, 64) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_prefix_reduction(dtype):
    tensors, mask, task_ids, d_out = make_inputs(4, 2, 23, 37, 32, dtype, 3, ((2, 5),))
    first = run_with_grads("cuda", tensors, mask, task_ids, d_out, options_for(32, deterministic=True))
    second = run_with_grads("cuda", tensors, mask, task_ids, d_out, options_for(32, deterministic=True))
    atomic = run_with_grads("cuda", tensors, mask, task_ids, d_out, options_for(32))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b, c in zip(NAMES, first, second, atomic):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=tol, atol=tol, msg=name)
