"""prefix_attention (torch and Triton backends) against an independent float64 reference: outputs and
all five gradients, over odd lengths, P = 0, P > N, padding, banks, strided inputs and every dtype.

Criterion (FlashAttention's): the error vs float64 is at most 2x the error of the concatenation
baseline run in the same dtype, plus a small absolute floor."""

import os

import pytest
import torch

from ptv2_kernels import concat_prefix_attention, prefix_attention

from .reference import reference_attention

# CPU in CI (Triton in its interpreter); PTV2_TEST_DEVICE=cuda runs the same tests on a GPU.
DEVICE = torch.device(os.environ.get("PTV2_TEST_DEVICE", "cpu"))
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKENDS = ["torch", "triton"]


def make_inputs(batch, heads, seq, num_prefix, dim, dtype, *, tasks=None, padded_rows=(), seed=0, device=DEVICE):
    """Fresh random inputs ``[q, k, v, prefix_k, prefix_v], mask, task_ids, d_out`` on ``device``.
    ``padded_rows`` holds ``(row, length)`` pairs: that row is padded from ``length`` on (0 = fully padded).
    ``d_out`` is zero on padded query rows: their outputs are never read (SPEC §1), as in a model."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3))
    bank = () if tasks is None else (tasks,)
    prefix_k = torch.randn(*bank, heads, num_prefix, dim, generator=gen)
    prefix_v = torch.randn(*bank, heads, num_prefix, dim, generator=gen)
    mask = None
    if padded_rows:
        mask = torch.ones(batch, seq, dtype=torch.bool)
        for row, length in padded_rows:
            mask[row, length:] = False
    # rows use tasks 0 .. T-2 in a shuffled, repeating order: the last task is never used
    task_ids = None if tasks is None else (torch.arange(batch) % max(1, tasks - 1)).flip(0)
    d_out = torch.randn(batch, heads, seq, dim, generator=gen)
    if mask is not None:
        d_out = real_rows(d_out, mask)
    tensors = [t.to(device, dtype) for t in (q, k, v, prefix_k, prefix_v)]
    mask, task_ids = (None if t is None else t.to(device) for t in (mask, task_ids))
    return tensors, mask, task_ids, d_out.to(device, dtype)


def real_rows(x, mask):
    """``x`` ``[B, H, N, D]`` with padded query rows (``mask`` ``[B, N]`` False) zeroed; ``x`` if no mask. Padded
    rows' outputs may hold any finite value (SPEC §1): the Triton kernels write 0, the torch backend computes them."""
    return x if mask is None else x * mask.to(x.device)[:, None, :, None]


def max_abs(x):
    return x.abs().max().item() if x.numel() else 0.0


def run_with_grads(fn, tensors, d_out, packed=False, **kwargs):
    """``[out, dq, dk, dv, dprefix_k, dprefix_v]`` of ``fn``. With ``packed``, q/k/v reach ``fn`` as
    strided views of one ``[B, N, 3, H, D]`` leaf (the layout transformers hands over)."""
    prefix = [t.detach().clone().requires_grad_() for t in tensors[3:]]
    if packed:
        qkv = torch.stack([t.detach().transpose(1, 2) for t in tensors[:3]], 2).requires_grad_()
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (t.detach().clone().requires_grad_() for t in tensors[:3])
    out = fn(q, k, v, *prefix, **kwargs)
    out.backward(d_out.to(out.dtype))
    qkv_grads = [qkv.grad[:, :, i].transpose(1, 2) for i in range(3)] if packed else [q.grad, k.grad, v.grad]
    return [out.detach()] + qkv_grads + [t.grad for t in prefix]


def assert_matches_reference(backend, tensors, mask, task_ids, d_out, packed=True, **kwargs):
    got = run_with_grads(prefix_attention, tensors, d_out, packed=packed, key_padding_mask=mask,
                         task_ids=task_ids, backend=backend, **kwargs)
    ref = run_with_grads(reference_attention, [t.double() for t in tensors], d_out.double(), mask=mask,
                         task_ids=task_ids, scale=kwargs.get("scale"))
    base = run_with_grads(concat_prefix_attention, tensors, d_out, key_padding_mask=mask, task_ids=task_ids,
                          scale=kwargs.get("scale"), impl="eager")
    floor = FLOOR[tensors[0].dtype]
    for name, g, r, c in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], got, ref, base):
        assert g.dtype == c.dtype and g.shape == c.shape, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if name == "out":
            g, r, c = (real_rows(t, mask) for t in (g, r, c))
        err = max_abs(g.double() - r)
        base_err = max_abs((c.double() - r).nan_to_num(0.0))  # concat gives NaN on fully padded rows
        assert err <= 2 * base_err + floor, f"{name}: error {err:.3g} vs baseline {base_err:.3g} (+{floor})"
    return got


GRID = [
    # batch, heads, seq, prefix, dim, tasks, padded_rows
    pytest.param(2, 2, 37, 20, 32, None, ((1, 25),), id="odd-N-padded"),
    pytest.param(2, 2, 1, 5, 16, None, (), id="N=1"),
    pytest.param(3, 2, 19, 0, 32, None, ((0, 7), (2, 0)), id="P=0-fully-padded-row"),
    pytest.param(2, 1, 9, 45, 16, None, ((0, 4),), id="P>N"),
    pytest.param(1, 2, 70, 33, 64, None, ((0, 65),), id="multi-tile"),
    pytest.param(2, 2, 21, 11, 24, None, (), id="D=24"),
    pytest.param(3, 2, 17, 9, 32, 4, ((1, 3), (2, 0)), id="bank-fully-padded-row"),
    pytest.param(5, 1, 13, 6, 16, 4, ((4, 10),), id="bank-repeated-unused"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,heads,seq,num_prefix,dim,tasks,padded_rows", GRID)
def test_matches_reference_fp32(backend, batch, heads, seq, num_prefix, dim, tasks, padded_rows):
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, torch.float32, tasks=tasks,
                                                 padded_rows=padded_rows)
    assert_matches_reference(backend, tensors, mask, task_ids, d_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 2, 37, 20, 64, None), (3, 2, 17, 9, 32, 2)], ids=["single", "bank"])
def test_matches_reference_half(backend, dtype, case):
    batch, heads, seq, num_prefix, dim, tasks = case
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, dtype, tasks=tasks,
                                                 padded_rows=((1, 11),), seed=1)
    assert_matches_reference(backend, tensors, mask, task_ids, d_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_128_contiguous_and_custom_scale(backend):
    tensors, mask, task_ids, d_out = make_inputs(2, 1, 33, 17, 128, torch.float32, padded_rows=((0, 30),),
                                                 seed=2)
    assert_matches_reference(backend, tensors, mask, task_ids, d_out, packed=False, scale=0.3)


def test_triton_output_is_stored_as_bnhd():
    tensors, mask, task_ids, _ = make_inputs(2, 3, 9, 4, 16, torch.float32)
    out = prefix_attention(*tensors, backend="triton")
    assert out.shape == (2, 3, 9, 16) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_prefix_reduction(backend):
    tensors, mask, task_ids, d_out = make_inputs(4, 2, 23, 37, 32, torch.float32, tasks=3, padded_rows=((2, 5),))
    kwargs = dict(key_padding_mask=mask, task_ids=task_ids, backend=backend)
    first = run_with_grads(prefix_attention, tensors, d_out, deterministic=True, **kwargs)
    second = run_with_grads(prefix_attention, tensors, d_out, deterministic=True, **kwargs)
    atomic = run_with_grads(prefix_attention, tensors, d_out, **kwargs)
    for a, b, c in zip(first, second, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_the_cpu_kernel(monkeypatch):
    """auto on CPU tensors runs the fused C++ kernel (backend="cpu")."""
    from ptv2_kernels.ops import cpu_backend

    calls = []
    original = cpu_backend.cpu_forward
    monkeypatch.setattr(cpu_backend, "cpu_forward", lambda *a: calls.append(1) or original(*a))
    tensors, mask, task_ids, _ = make_inputs(1, 1, 4, 2, 16, torch.float32, device="cpu")
    prefix_attention(*tensors)
    assert calls == [1]


def test_gradcheck_torch_backend_float64():
    from ptv2_kernels.ops.common import Dropout, Options
    from ptv2_kernels.ops.library import attend

    tensors, mask, task_ids, _ = make_inputs(3, 2, 5, 3, 4, torch.float64, tasks=2, padded_rows=((1, 2),))
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    bias = torch.randn(3, 2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    plain = Options(scale=0.5, dropout=Dropout())
    dropped = Options(scale=0.5, dropout=Dropout(p=0.3, prefix_p=0.4, seed=1234))
    for options in (plain, dropped):
        assert torch.autograd.gradcheck(lambda *t: attend("torch-ref", *t, mask, task_ids, *(None,) * 5, options),
                                        tensors)
    assert torch.autograd.gradcheck(lambda *t: attend("torch-ref", *t[:5], mask, task_ids, t[5], *(None,) * 4, dropped),
                                    tensors + [bias])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,heads,seq,num_prefix,tasks,padded_rows,bias_batch", [
    (3, 2, 37, 20, 3, ((1, 25),), 3),
    (2, 2, 19, 0, None, ((0, 7), (1, 0)), 1),
], ids=["bank-full-bias", "P=0-broadcast-bias"])
def test_attention_bias_and_its_gradient(backend, batch, heads, seq, num_prefix, tasks, padded_rows, bias_batch):
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, 32, torch.float32, tasks=tasks,
                                                 padded_rows=padded_rows, seed=3)
    bias = torch.randn(bias_batch, heads, seq, seq, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    bias_leaf = bias.clone().requires_grad_()
    got = run_with_grads(prefix_attention, tensors, d_out, packed=True, key_padding_mask=mask, task_ids=task_ids,
                         attn_bias=bias_leaf, backend=backend)
    ref_bias = bias.double().requires_grad_()
    ref = run_with_grads(reference_attention, [t.double() for t in tensors], d_out.double(), mask=mask,
                         task_ids=task_ids, bias=ref_bias)
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias"]
    for name, g, r in zip(names, got + [bias_leaf.grad], ref + [ref_bias.grad]):
        if name == "out":
            g, r = real_rows(g, mask), real_rows(r, mask)
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("padded_rows", [((1, 4), (2, 0)), ()], ids=["padded", "unpadded-broadcast"])
def test_constant_bias_without_its_gradient(padded_rows):
    """A bias that needs no gradient (the torch backend's CPU flash backward, the bias in its float mask)."""
    tensors, mask, task_ids, d_out = make_inputs(3, 2, 11, 5, 16, torch.float32, tasks=2, padded_rows=padded_rows,
                                                 seed=6)
    bias = torch.randn(3 if padded_rows else 1, 2, 11, 11, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = run_with_grads(prefix_attention, tensors, d_out, key_padding_mask=mask, task_ids=task_ids, attn_bias=bias,
                         backend="torch")
    ref = run_with_grads(reference_attention, [t.double() for t in tensors], d_out.double(), mask=mask,
                         task_ids=task_ids, bias=bias.expand(3, 2, 11, 11).double())
    for name, g, r in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], got, ref):
        if name == "out":
            g, r = real_rows(g, mask), real_rows(r, mask)
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="large shapes run on a GPU (PTV2_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq,num_prefix,tasks", [(512, 128, None), (200, 64, 8), (128, 16, None)])
def test_large_shapes_gpu(dtype, seq, num_prefix, tasks):
    tensors, mask, task_ids, d_out = make_inputs(8, 12, seq, num_prefix, 64, dtype, tasks=tasks,
                                                 padded_rows=((1, seq // 3), (5, 1)), seed=5)
    assert_matches_reference("triton", tensors, mask, task_ids, d_out)
