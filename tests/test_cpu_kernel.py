"""The fused C++ CPU kernel (``backend="torch"`` on CPU tensors) and the pure-PyTorch reference path
(``backend="torch-ref"``) beyond the grid every backend shares (``test_prefix_attention.py``,
``test_varlen.py``, ``test_dropout.py``, ``test_disentangled.py`` run it as "torch"): that the kernel is
built (else all of those would quietly test the fallback), the shared grid on torch-ref, several key chunks
and query blocks with padding holes, strided banks and biases, head sizes across register panels, float64
gradcheck (dropout, bias, banks, packed rows), packed rows with dropout, DeBERTa's relative terms gathered
in-kernel with dropout, bitwise-identical results with 1 and 2 threads, and the fallback when the extension
cannot be built."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ptv2_kernels import DisentangledBias, prefix_attention, prefix_attention_varlen
from ptv2_kernels.ops import cpu_backend
from ptv2_kernels.ops.common import Dropout, Options
from ptv2_kernels.ops.library import attend

from .reference import dropout_masks_v2, reference_attention
from .test_prefix_attention import GRID, assert_matches_reference, make_inputs, run_with_grads
from .test_varlen import packed_case, padded

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
pytestmark = pytest.mark.skipif(os.environ.get("PTV2_TEST_DEVICE", "cpu") != "cpu", reason="CPU kernel tests")


def test_kernel_is_built():
    available, how = cpu_backend.cpu_kernel_status()
    assert available, f"the fused CPU kernel did not build: {how}"


@pytest.mark.parametrize("batch,heads,seq,num_prefix,dim,tasks,padded_rows", GRID)
def test_reference_path_matches_reference(batch, heads, seq, num_prefix, dim, tasks, padded_rows):
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, torch.float32, tasks=tasks,
                                                 padded_rows=padded_rows)
    assert_matches_reference("torch-ref", tensors, mask, task_ids, d_out)


def _mask_with_holes(batch, seq):
    """Row 0 real, row 1 a hole over a whole key chunk (128..259) and a padded tail, row 2 fully padded."""
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 120:270] = False
    mask[1, 290:] = False
    mask[2] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_chunks_blocks_and_holes(dtype):
    """N = 300 and P = 150 span several key chunks (128) and query blocks (32): the online softmax rescales,
    a chunk with no visible key is skipped, a partial one masked."""
    tensors, _, task_ids, d_out = make_inputs(3, 2, 300, 150, 32, dtype, tasks=2, seed=11)
    mask = _mask_with_holes(3, 300)
    assert_matches_reference("torch", tensors, mask, task_ids, d_out)


@pytest.mark.parametrize("dim", [80, 8])
def test_head_dims_across_register_panels(dim):
    """D = 80: one full 64-wide panel plus a partial one; D = 8: half a vector."""
    tensors, mask, task_ids, d_out = make_inputs(2, 2, 45, 13, dim, torch.float32, padded_rows=((1, 30),), seed=12)
    assert_matches_reference("torch", tensors, mask, task_ids, d_out)


def test_strided_bank_and_bias_read_in_place():
    """The bank as the patch passes it (a view of ``[T, L, 2, H, P, D]``, strided in T), a bias broadcast
    over queries (``[B, H, 1, N]`` expanded: stride 0) and transposed keys-major storage."""
    batch, heads, seq, num_prefix, dim, tasks = 3, 2, 41, 9, 16, 3
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, torch.float32, tasks=tasks,
                                                 padded_rows=((2, 17),), seed=13)
    gen = torch.Generator().manual_seed(14)
    whole = torch.randn(tasks, 4, 2, heads, num_prefix, dim, generator=gen)
    prefix_k, prefix_v = whole[:, 1, 0], whole[:, 1, 1]
    assert not prefix_k.is_contiguous()
    bias = torch.randn(batch, heads, seq, generator=gen)[:, :, None, :].expand(batch, heads, seq, seq)
    bias_t = torch.randn(batch, heads, seq, seq, generator=gen).transpose(-1, -2)  # unit stride along queries

    for b in (bias, bias_t):
        got = run_with_grads(prefix_attention, tensors[:3] + [prefix_k, prefix_v], d_out, packed=True,
                             key_padding_mask=mask, task_ids=task_ids, attn_bias=b, backend="torch")
        ref = run_with_grads(reference_attention, [t.double() for t in tensors[:3] + [prefix_k, prefix_v]],
                             d_out.double(), mask=mask, task_ids=task_ids, bias=b.double())
        for name, g, r in zip(NAMES, got, ref):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=2e-5, msg=name)


def _gradcheck(tensors, mask, task_ids, bias, cu_seqlens, options):
    def run(*t):
        extra = t[5] if bias is not None else None
        return attend("cpu", *t[:5], mask, task_ids, extra, None, None, None, cu_seqlens, options)

    leaves = [t.detach().clone().requires_grad_() for t in tensors + ([bias] if bias is not None else [])]
    assert torch.autograd.gradcheck(run, leaves)


@pytest.mark.parametrize("dropout", [Dropout(), Dropout(p=0.3, prefix_p=0.4, seed=1234)], ids=["plain", "dropout"])
def test_gradcheck_float64(dropout):
    tensors, mask, task_ids, _ = make_inputs(3, 2, 5, 3, 4, torch.float64, tasks=2, padded_rows=((1, 2), (2, 0)))
    bias = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    options = Options(scale=0.5, dropout=dropout)
    _gradcheck(tensors, mask, task_ids, None, None, options)
    _gradcheck(tensors, mask, task_ids, bias, None, options)


def test_gradcheck_float64_packed():
    tensors, cu_seqlens, task_ids, _, _, _ = packed_case([4, 0, 6], 2, 3, 4, tasks=2, seed=3)
    tensors = [t.double() for t in tensors]
    options = Options(scale=0.4, dropout=Dropout(p=0.2, prefix_p=0.3, seed=77), max_seqlen=6)
    _gradcheck(tensors, None, task_ids, None, cu_seqlens, options)


def test_packed_dropout_uses_the_padded_masks():
    """A packed row draws the masks of the same padded row (positions within the row), and both are
    contract v2's."""
    lengths, heads, num_prefix, dim = [21, 9], 2, 7, 16
    tensors, cu_seqlens, _, d_out, row, position = packed_case(lengths, heads, num_prefix, dim, seed=1)
    dropout = Dropout(p=0.3, prefix_p=0.2, seed=99)
    bank = [t.unsqueeze(0) for t in tensors[3:]]
    got = run_with_grads(lambda *t: attend("cpu", *t, None, None, *(None,) * 4, cu_seqlens,
                                           Options(0.25, dropout, max_seqlen=21)),
                         tensors[:3] + bank, d_out)
    mask = padded(torch.ones(sum(lengths), dtype=torch.bool), row, position, 2, 21)
    pad = [padded(t, row, position, 2, 21) for t in tensors[:3] + [d_out]]
    keep = dropout_masks_v2(dropout.seed, 2, heads, 21, num_prefix, dim, dropout.p, dropout.prefix_p)
    ref = run_with_grads(reference_attention, [t.double() for t in pad[:3] + tensors[3:]], pad[3].double(),
                         mask=mask, scale=0.25, attn_keep=keep[0], keep_k=keep[1], keep_v=keep[2], p=dropout.p,
                         prefix_p=dropout.prefix_p)
    unpack = (lambda t: t.transpose(1, 2)[row, position])
    for name, g, r in zip(NAMES[:4], got[:4], ref[:4]):
        torch.testing.assert_close(g.double(), unpack(r), rtol=1e-4, atol=2e-5, msg=name)
    for name, g, r in zip(NAMES[4:], got[4:], ref[4:]):
        torch.testing.assert_close(g.double().squeeze(0), r, rtol=1e-4, atol=2e-5, msg=name)


def test_packed_bfloat16_equals_padded():
    lengths = [33, 1, 17]
    tensors, cu_seqlens, task_ids, d_out, row, position = packed_case(lengths, 2, 5, 32, tasks=2, seed=4)
    tensors, d_out = [t.bfloat16() for t in tensors], d_out.bfloat16()
    got = run_with_grads(prefix_attention_varlen, tensors, d_out, cu_seqlens=cu_seqlens, task_ids=task_ids,
                         backend="torch")
    mask = padded(torch.ones(sum(lengths), dtype=torch.bool), row, position, 3, 33)
    pad = [padded(t, row, position, 3, 33) for t in tensors[:3] + [d_out]]
    ref = run_with_grads(prefix_attention, pad[:3] + tensors[3:], pad[3], key_padding_mask=mask, task_ids=task_ids,
                         backend="torch")
    unpack = (lambda t: t.transpose(1, 2)[row, position])
    for name, g, r in zip(NAMES[:4], got[:4], ref[:4]):
        assert torch.equal(g, unpack(r)), name
    for name, g, r in zip(NAMES[4:], got[4:], ref[4:]):
        assert torch.equal(g, r), name


def test_relative_terms_in_kernel_with_dropout():
    """DeBERTa's c2p/p2c gathered in the kernel (no [B, H, N, N] bias) with attention dropout over two key
    chunks: outputs and every gradient, relative embeddings included, against the float64 reference fed the
    contract v2 masks."""
    from .test_disentangled import reference_relative_bias, relative_case, relative_positions

    batch, heads, seq, num_prefix, dim, span, p = 2, 2, 150, 7, 16, 40, 0.25
    tensors, mask, _, d_out = make_inputs(batch, heads, seq, num_prefix, dim, torch.float32, padded_rows=((1, 90),),
                                          seed=15)
    embeddings = relative_case(heads, dim, span, ("c2p", "p2c"), torch.float32, 16)
    rel = relative_positions(seq, 16, 128)
    torch.manual_seed(17)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    keep = dropout_masks_v2(seed, batch, heads, seq, num_prefix, dim, p, 0.0)[0]

    def fused(q, k, v, pk, pv, pos_key, pos_query):
        bias = DisentangledBias.from_relative_positions(rel, span, pos_key, pos_query)
        torch.manual_seed(17)
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, scale=0.2, dropout_p=p,
                                disentangled_bias=bias, backend="torch")

    def reference(q, k, v, pk, pv, pos_key, pos_query):
        bias = reference_relative_bias(q, k, pos_key, pos_query, rel, span, 0.2)
        return reference_attention(q, k, v, pk, pv, mask=mask, scale=0.2, bias=bias, attn_keep=keep, p=p)

    got = _with_grads(fused, tensors + embeddings, d_out)
    ref = _with_grads(reference, [t.double() for t in tensors + embeddings], d_out.double())
    for name, g, r in zip(NAMES + ["dpos_key", "dpos_query"], got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=3e-5, msg=name)


def _with_grads(fn, tensors, d_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(d_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _all_outputs():
    """Outputs and every gradient of a padded call (bank, holes, bias, both dropouts), one with DeBERTa's
    relative terms and a packed call."""
    tensors, _, task_ids, d_out = make_inputs(4, 3, 150, 40, 32, torch.float32, tasks=3, seed=21)
    mask = torch.ones(4, 150, dtype=torch.bool)
    mask[1, 60:] = False
    mask[3, 10:140] = False
    bias = torch.randn(4, 3, 150, 150, generator=torch.Generator().manual_seed(22))
    results = []
    for kwargs in (dict(attn_bias=bias.clone().requires_grad_()), dict(dropout_p=0.2, prefix_dropout_p=0.1)):
        torch.manual_seed(5)
        results += run_with_grads(prefix_attention, tensors, d_out, packed=True, key_padding_mask=mask,
                                   task_ids=task_ids, backend="torch", **kwargs)
        if "attn_bias" in kwargs:
            results.append(kwargs["attn_bias"].grad)
    from .test_disentangled import relative_case, relative_positions

    pos_key, pos_query = relative_case(3, 32, 64, ("c2p", "p2c"), torch.float32, 24)
    rel = DisentangledBias.from_relative_positions(relative_positions(150, 32, 256), 64)
    results += _with_grads(lambda *t: prefix_attention(*t[:5], key_padding_mask=mask, task_ids=task_ids,
                                                       disentangled_bias=rel.with_embeddings(*t[5:]), backend="torch"),
                           tensors + [pos_key, pos_query], d_out)
    packed, cu_seqlens, packed_tasks, packed_grad, _, _ = packed_case([70, 3, 150, 41], 3, 40, 32, tasks=3, seed=23)
    torch.manual_seed(6)
    results += run_with_grads(prefix_attention_varlen, packed, packed_grad, cu_seqlens=cu_seqlens,
                              task_ids=packed_tasks, dropout_p=0.1, backend="torch")
    return results


def test_one_and_two_threads_give_identical_bits():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _all_outputs()
        torch.set_num_threads(2)
        double = _all_outputs()
    finally:
        torch.set_num_threads(threads)
    assert len(single) == len(double) == 27
    for i, (a, b) in enumerate(zip(single, double)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"


def test_cuda_tensors_and_torch_ref_take_the_composition():
    assert not cpu_backend.use_cpu_kernel("torch-ref", torch.device("cpu"))
    assert not cpu_backend.use_cpu_kernel("torch", torch.device("cuda"))
    assert cpu_backend.use_cpu_kernel("torch", torch.device("cpu"))
    assert cpu_backend.use_cpu_kernel("auto", torch.device("cpu"))


def test_fallback_warns_once_and_computes_the_same(monkeypatch):
    """An extension that cannot be built: backend='torch' warns once and runs the composition."""
    monkeypatch.setattr(cpu_backend, "_load", lambda: (None, "simulated: no compiler"))
    cpu_backend._warn_fallback.cache_clear()
    tensors, mask, task_ids, d_out = make_inputs(2, 2, 19, 7, 16, torch.float32, padded_rows=((1, 5),), seed=8)
    with pytest.warns(RuntimeWarning, match="simulated: no compiler.*torch-ref"):
        fallback = run_with_grads(prefix_attention, tensors, d_out, key_padding_mask=mask, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefix_attention(*tensors, key_padding_mask=mask)
    reference = run_with_grads(prefix_attention, tensors, d_out, key_padding_mask=mask, backend="torch-ref")
    for name, a, b in zip(NAMES, fallback, reference):
        assert torch.equal(a, b), name
    cpu_backend._warn_fallback.cache_clear()


def test_import_and_run_without_a_compiler(tmp_path):
    """A fresh process with no C++ compiler, no ahead-of-time build and an empty extension cache: importing
    builds nothing, and the op still runs (the composition, with the warning)."""
    script = (
        "import sys\n"
        "import warnings, torch, ptv2_kernels\n"
        "from ptv2_kernels.build_spec import cpu_spec\n"
        "sys.modules[cpu_spec('DEFAULT', portable=True).module] = None  # no ahead-of-time build either\n"
        "from ptv2_kernels.ops import cpu_backend\n"
        "assert cpu_backend._load.cache_info().currsize == 0, 'import must not build'\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out = ptv2_kernels.prefix_attention(q, q, q, torch.randn(2, 3, 16), torch.randn(2, 3, 16))\n"
        "assert out.shape == (1, 2, 5, 16)\n"
        "assert any('no C++ compiler' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
