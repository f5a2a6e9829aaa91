"""The Triton kernels' own paths against the float64 reference (Triton interpreter on CPU): the padding fast
path under any mask (rows stop at their last real token; padded query rows output 0 and contribute no
gradient), the GPU tile sizes (64/128) rather than the interpreter's 32, the chunked prefix-gradient
reduction and its deterministic twin, and indices read from memory that are out of range."""

import pytest
import torch

from ptv2_kernels import prefix_attention_varlen
from ptv2_kernels.ops import triton_backend
from ptv2_kernels.ops.common import Dropout, Options
from ptv2_kernels.ops.library import attend

from .reference import dropout_masks_v2, reference_attention
from .test_disentangled import check, relative_positions
from .test_prefix_attention import DEVICE, make_inputs, max_abs, real_rows, run_with_grads

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]


def masks(batch, seq, kind, gen):
    """A ``[B, N]`` padding mask: right padding of random lengths, left padding, random holes, or mixed (one row
    fully padded)."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    position = torch.arange(seq)[None, :]
    if kind == "right":
        return position < lengths[:, None]
    if kind == "left":
        return position >= seq - lengths[:, None]
    holes = torch.rand(batch, seq, generator=gen) > 0.4
    holes[0] = False  # a fully padded row
    return holes


def apply(tensors, mask, task_ids, options, cu_seqlens=None):
    """The registered op (Triton) on a ``[T, H, P, D]`` bank (a single prefix gets T = 1)."""
    prefix = [t if t.dim() == 4 else t.unsqueeze(0) for t in tensors[3:]]
    return attend("triton", *tensors[:3], *prefix, mask, task_ids, None, None, None, None, cu_seqlens,
                                       options)


def check_against_reference(got, tensors, mask, task_ids, d_out, options, tol=2e-5):
    """``got`` ``[out, grads]`` vs float64 concatenation with the contract-v2 masks of ``options``: padded query rows
    output exactly 0, and their ``d_out`` (random here) must not reach any gradient."""
    drop = options.dropout
    batch, heads, seq, dim = tensors[0].shape
    keep = dropout_masks_v2(drop.seed, batch, heads, seq, tensors[3].shape[-2], dim, drop.p, drop.prefix_p)
    ref = run_with_grads(reference_attention, [t.double() for t in tensors], real_rows(d_out, mask).double(),
                         mask=mask, task_ids=task_ids, scale=options.scale, attn_keep=keep[0], keep_k=keep[1],
                         keep_v=keep[2], p=drop.p, prefix_p=drop.prefix_p)
    for name, g, r in zip(NAMES, got, ref):
        assert torch.isfinite(g).all(), name
        g = g.double().reshape(r.shape)
        if name == "out":
            if mask is not None:
                assert torch.equal(g - real_rows(g, mask), torch.zeros_like(g)), "padded rows must output 0"
            g, r = real_rows(g, mask), real_rows(r, mask)
        assert max_abs(g - r) <= tol * max(1.0, max_abs(r)), f"{name}: {max_abs(g - r):.3g}"


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("num_prefix", [0, 13, 45])
def test_padding_fast_path_any_mask(kind, num_prefix):
    """Every mask shape gives the reference on real tokens, exactly 0 on padded rows, and gradients that ignore
    the padded rows' d_out; P = 0 (a fully padded row sees no column at all) and P > N included."""
    gen = torch.Generator().manual_seed(num_prefix)
    batch, heads, seq, dim = 3, 2, 37, 16
    tensors, _, _, d_out = make_inputs(batch, heads, seq, num_prefix, dim, torch.float32, seed=num_prefix)
    mask = masks(batch, seq, kind, gen).to(DEVICE)
    options = Options(scale=0.3, dropout=Dropout())
    got = run_with_grads(lambda *t: apply(t, mask, None, options), tensors, d_out, packed=True)
    check_against_reference(got, tensors, mask, None, d_out, options)


@pytest.mark.parametrize("tiles", [(64, 64), (128, 64), (64, 128)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_gpu_tile_sizes(monkeypatch, tiles):
    """The tile sizes the GPU autotunes over, under the interpreter: rows spanning several tiles, a bank, padding,
    attention and prefix dropout (P not a multiple of 4: the shifted sequence tiles of the dropout counters)."""
    monkeypatch.setattr(triton_backend, "INTERPRETER_TILES", {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]})
    tensors, mask, task_ids, d_out = make_inputs(3, 1, 150, 70, 32, torch.float32, tasks=3,
                                                 padded_rows=((0, 140), (2, 65)), seed=7)
    options = Options(scale=0.2, dropout=Dropout(0.2, 0.3, 2**40 + 9))
    got = run_with_grads(lambda *t: apply(t, mask, task_ids, options), tensors, d_out, packed=True)
    check_against_reference(got, tensors, mask, task_ids, d_out, options)


def test_gpu_tile_sizes_deberta(monkeypatch):
    """DeBERTa's c2p/p2c windows at 64 x 64 tiles (its GPU config), against the float64 reference: log buckets,
    a clamped span, padding, a bank, trained relative embeddings."""
    monkeypatch.setattr(triton_backend, "INTERPRETER_TILES", {"BLOCK_M": 64, "BLOCK_N": 64})
    check("triton", 2, 1, 100, 9, 16, 2, ((1, 70),), relative_positions(100, 32, 128), 16, ("c2p", "p2c"), seed=8)


@pytest.mark.parametrize("prefix_p,tasks", [(0.0, None), (0.0, 3), (0.3, 3)], ids=["chunks", "bank-runs", "bank-rows"])
def test_deterministic_equals_fast_and_reproduces(monkeypatch, prefix_p, tasks):
    """deterministic=True (per-run partials, fixed-order sum; under prefix dropout one run per row, in groups)
    is bitwise reproducible and equals the atomic path. Several chunks and task runs: the row order interleaves
    the tasks, and the interpreter's 2 'SMs' make chunks of a few rows."""
    monkeypatch.setattr(triton_backend, "INTERPRETER_SMS", 1)
    batch = 7
    tensors, mask, _, d_out = make_inputs(batch, 1, 19, 20, 16, torch.float32, tasks=tasks,
                                          padded_rows=((2, 5), (4, 0)), seed=11)
    task_ids = None if tasks is None else torch.tensor([2, 0, 2, 1, 0, 2, 2], device=DEVICE)
    assert triton_backend.prefix_chunk(batch, 1, 20, DEVICE) < batch  # several chunks
    runs = []
    for deterministic in (True, True, False):
        options = Options(scale=0.25, dropout=Dropout(0.1, prefix_p, 5), deterministic=deterministic)
        runs.append(run_with_grads(lambda *t: apply(t, mask, task_ids, options), tensors, d_out, packed=True))
    for name, first, second, fast in zip(NAMES, *runs):
        assert torch.equal(first, second), name
        torch.testing.assert_close(first, fast, rtol=1e-5, atol=1e-6, msg=name)
    check_against_reference(runs[0], tensors, mask, task_ids, d_out, options)


def test_padded_rows_do_not_reach_gradients():
    """A padded query row's output gradient changes nothing: gradients with random and with zero d_out on
    padded rows are bitwise equal (both dropouts, a bank)."""
    tensors, mask, task_ids, d_out = make_inputs(3, 2, 23, 6, 16, torch.float32, tasks=2,
                                                 padded_rows=((0, 9), (2, 0)), seed=12)
    noisy = d_out + torch.randn(d_out.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    options = Options(scale=0.25, dropout=Dropout(0.2, 0.2, 77))
    clean = run_with_grads(lambda *t: apply(t, mask, task_ids, options), tensors, real_rows(noisy, mask), packed=True)
    dirty = run_with_grads(lambda *t: apply(t, mask, task_ids, options), tensors, noisy, packed=True)
    for name, a, b in zip(NAMES, clean, dirty):
        assert torch.equal(a, b), name


def test_indices_from_memory_are_clamped():
    """Task ids, cu_seqlens and relative-index entries out of range cannot make a kernel read out of bounds:
    they are clamped (a task id to [0, T), cu_seqlens to [0, total], a relative index to [0, R)). Validation is
    bypassed on purpose (the registered op directly): on CUDA tensors it is a device-side check."""
    tensors, mask, _, _ = make_inputs(3, 2, 11, 5, 16, torch.float32, tasks=2, padded_rows=((1, 4),), seed=13)
    options = Options(scale=0.25, dropout=Dropout(0.1, 0.1, 3))
    wild = apply(tensors, mask, torch.tensor([-4, 1, 9], device=DEVICE), options)
    clamped = apply(tensors, mask, torch.tensor([0, 1, 1], device=DEVICE), options)
    assert torch.equal(wild, clamped)

    q = torch.randn(10, 2, 16, device=DEVICE)
    prefix = [torch.randn(1, 2, 3, 16, device=DEVICE) for _ in range(2)]
    for cu in ([0, 4, 25], [0, -7, 10], [3, 2, 1]):  # tokens no row covers stay unwritten: only no crash here
        out = attend("triton", q, q, q, *prefix, None, None, None, None, None, None,
                                          torch.tensor(cu, device=DEVICE), Options(0.25, Dropout(), max_seqlen=6))
        assert out.shape == q.shape

    q, k, v, pk, pv = make_inputs(1, 2, 9, 3, 16, torch.float32, seed=14)[0]
    pos = torch.randn(2, 4, 16, device=DEVICE)
    index = torch.randint(-50, 50, (2, 17), dtype=torch.int32, device=DEVICE)
    wild = attend("triton", q, k, v, pk[None], pv[None], None, None, None, pos, pos, index, None,
                                       Options(0.25, Dropout()))
    tame = attend("triton", q, k, v, pk[None], pv[None], None, None, None, pos, pos, index.clamp(0, 3),
                                       None, Options(0.25, Dropout()))
    assert torch.equal(wild, tame)


def test_grids_are_one_dimensional_for_any_batch_and_heads(monkeypatch):
    """Every launch is a 1-D grid (axis 0 takes 2**31 - 1 programs; axes 1 and 2 only 65535), so B * H > 65535
    launches: recorded without running on B * H = 70000."""
    grids = []

    def record(tuned, grid, fixed, **kwargs):
        grids.append((tuned.fn.__name__, grid(dict(triton_backend.INTERPRETER_TILES, num_warps=4))))

    monkeypatch.setattr(triton_backend, "_launch", record)
    q = torch.zeros(70000, 1, 2, 16, device=DEVICE, requires_grad=True)
    prefix = torch.zeros(1, 1, 3, 16, device=DEVICE, requires_grad=True)
    out = attend("triton", q, q, q, prefix, prefix, None, None, None, None, None, None, None,
                                      Options(0.25, Dropout()))
    out.sum().backward()
    assert {name for name, _ in grids} == {"prefix_attention_fwd_kernel", "prefix_attention_bwd_dq_kernel",
                                           "prefix_attention_bwd_dprefix_kernel", "prefix_attention_bwd_dkdv_kernel"}
    for name, grid in grids:
        assert len(grid) == 1 and grid[0] >= 70000 * (name != "prefix_attention_bwd_dprefix_kernel"), (name, grid)


def test_varlen_stops_at_each_rows_length():
    """Packed rows of very different lengths (one empty) against the float64 reference row by row."""
    lengths = [40, 0, 3, 33]
    heads, num_prefix, dim = 2, 7, 16
    gen = torch.Generator().manual_seed(15)
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, dim, generator=gen).to(DEVICE)
    prefix = [torch.randn(heads, num_prefix, dim, generator=gen).to(DEVICE) for _ in range(2)]
    d_out = torch.randn(total, heads, dim, generator=gen).to(DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    got = run_with_grads(prefix_attention_varlen, [qkv[:, i] for i in range(3)] + prefix, d_out, cu_seqlens=cu,
                         backend="triton")
    dprefix = [torch.zeros_like(p, dtype=torch.float64) for p in prefix]
    for row, (start, end) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if end == start:
            continue
        part = [qkv[start:end, i].transpose(0, 1)[None].double() for i in range(3)] + [p.double() for p in prefix]
        ref = run_with_grads(reference_attention, part, d_out[start:end].transpose(0, 1)[None].double())
        for name, g, r in zip(NAMES[:4], got[:4], ref[:4]):
            assert max_abs(g[start:end].double() - r[0].transpose(0, 1)) <= 2e-5, (row, name)
        dprefix = [a + b for a, b in zip(dprefix, ref[4:])]
    for name, g, r in zip(NAMES[4:], got[4:], dprefix):
        assert max_abs(g.double() - r) <= 2e-5, name
