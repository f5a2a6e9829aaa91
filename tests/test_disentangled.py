"""DeBERTa's c2p/p2c through ``prefix_attention(disentangled_bias=...)``: outputs and every gradient (q, k, v,
the prefix and both relative embeddings) against an independent float64 reference that gathers the terms
exactly as transformers defines them, on both backends; plain distances with a span shorter than N (clamped
rows), transformers' log buckets, c2p or p2c alone, P = 0, banks, padding, dropout, half precision,
deterministic mode, and bad input."""

import pytest
import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

from ptv2_kernels import DisentangledBias, concat_prefix_attention, prefix_attention

from .reference import dropout_masks_v2, reference_attention
from .test_prefix_attention import BACKENDS, DEVICE, FLOOR, make_inputs, max_abs, real_rows, run_with_grads

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dpos_key", "dpos_query"]


def relative_positions(seq, buckets=-1, max_position=-1):
    """transformers' relative positions ``[N, N]`` (``i - j``, or its log buckets)."""
    x = torch.empty(1, seq, 1)
    return build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0]


def reference_relative_bias(q, k, pos_key, pos_query, rel, span, scale):
    """float64 ``scale * (c2p + p2c)`` ``[B, H, N, N]`` by transformers' definition: c2p[i, j] = q_i . pos_key[
    clamp(rel[i, j] + span)], p2c[i, j] = k_j . pos_query[clamp(-rel[j, i] + span)], rows clamped to [0, 2 span)."""
    rel = rel.long().to(q.device)
    out = 0
    if pos_key is not None:
        out = out + torch.einsum("bhid,hijd->bhij", q, pos_key[:, (rel + span).clamp(0, 2 * span - 1)])
    if pos_query is not None:
        out = out + torch.einsum("bhjd,hijd->bhij", k, pos_query[:, (span - rel.T).clamp(0, 2 * span - 1)])
    return out * scale


def relative_case(heads, dim, span, terms, dtype, seed):
    """Random relative embeddings ``[H, 2 span, D]`` for the terms in ``terms`` ("c2p", "p2c")."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, 2 * span, dim, generator=gen).to(DEVICE, dtype) if term in terms else None
            for term in ("c2p", "p2c")]


def check(backend, batch, heads, seq, num_prefix, dim, tasks, padded_rows, rel, span, terms, dtype=torch.float32,
          dropout_p=0.0, deterministic=False, seed=0, frozen=False):
    """With ``frozen`` the relative embeddings need no gradient (a frozen backbone): the kernels skip theirs."""
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, dtype, tasks=tasks,
                                                 padded_rows=padded_rows, seed=seed)
    embeddings = relative_case(heads, dim, span, terms, dtype, seed + 1)
    scale = 0.2
    present = [] if frozen else [e for e in embeddings if e is not None]

    def relative(emb, dtype):
        """(pos_key, pos_query): the differentiable leaves ``emb``, or the frozen embeddings in ``dtype``."""
        leaves = iter(emb)
        return [None if e is None else e.to(dtype) if frozen else next(leaves) for e in embeddings]

    def fused(q, k, v, prefix_k, prefix_v, *emb):
        pos_key, pos_query = relative(emb, q.dtype)
        bias = DisentangledBias.from_relative_positions(rel.to(DEVICE), span, pos_key, pos_query)
        return prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, task_ids=task_ids, scale=scale,
                                disentangled_bias=bias, dropout_p=dropout_p, backend=backend,
                                deterministic=deterministic)

    def reference(q, k, v, prefix_k, prefix_v, *emb):
        pos_key, pos_query = relative(emb, q.dtype)
        bias = reference_relative_bias(q, k, pos_key, pos_query, rel, span, scale)
        return reference_attention(q, k, v, prefix_k, prefix_v, mask=mask, task_ids=task_ids, scale=scale, bias=bias,
                                   attn_keep=keep, p=dropout_p)

    def baseline(q, k, v, prefix_k, prefix_v, *emb):  # concatenation in the same dtype (the error yardstick)
        pos_key, pos_query = relative(emb, q.dtype)
        bias = DisentangledBias.from_relative_positions(rel.to(DEVICE), span, pos_key, pos_query)
        return concat_prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, task_ids=task_ids,
                                       scale=scale, disentangled_bias=bias, impl="eager")

    keep = None
    if dropout_p:  # the fused kernels' masks (the contract), fed to the reference
        torch.manual_seed(seed)
        call_seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        keep = dropout_masks_v2(call_seed, batch, heads, seq, num_prefix, dim, dropout_p, 0.0)[0]
        torch.manual_seed(seed)
    got = with_grads(fused, tensors + present, d_out)
    ref = with_grads(reference, [t.double() for t in tensors + present], d_out.double())
    floor = FLOOR[dtype]
    base = with_grads(baseline, tensors + present, d_out) if not dropout_p else None
    names = NAMES[:6] + [name for name, e in zip(NAMES[6:], embeddings) if e is not None and not frozen]
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        b = None if base is None else base[i]
        if name == "out":  # padded query rows: any finite value (SPEC §1)
            g, r, b = (None if t is None else real_rows(t, mask) for t in (g, r, b))
        err = max_abs(g.double() - r)
        if base is None:
            assert err <= 1e-4 * max(1.0, max_abs(r)), f"{name}: error {err:.3g}"
        else:
            base_err = max_abs((b.double() - r).nan_to_num(0.0))
            assert err <= 2 * base_err + floor * max(1.0, max_abs(r)), f"{name}: {err:.3g} vs baseline {base_err:.3g}"
    return got


def with_grads(fn, tensors, d_out):
    """``[out, grads of every input]`` of ``fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(d_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


CASES = [
    # batch, heads, seq, prefix, dim, tasks, padded_rows, relative positions, span, terms
    pytest.param(2, 2, 45, 7, 16, None, ((1, 30),), relative_positions(45), 8, ("c2p", "p2c"), id="span<N-padded"),
    pytest.param(3, 2, 40, 5, 32, 3, ((2, 9),), relative_positions(40, 8, 64), 8, ("c2p", "p2c"), id="buckets-bank"),
    pytest.param(3, 1, 33, 0, 16, None, ((0, 20), (2, 0)), relative_positions(33), 40, ("c2p",),
                 id="c2p-only-P=0-fully-padded-span>N"),
    pytest.param(2, 2, 70, 9, 24, None, (), relative_positions(70, 16, 128), 16, ("p2c",), id="p2c-only-buckets-D=24"),
    pytest.param(2, 1, 1, 3, 16, None, (), relative_positions(1), 2, ("c2p", "p2c"), id="N=1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,heads,seq,num_prefix,dim,tasks,padded_rows,rel,span,terms", CASES)
def test_matches_reference_fp32(backend, batch, heads, seq, num_prefix, dim, tasks, padded_rows, rel, span, terms):
    check(backend, batch, heads, seq, num_prefix, dim, tasks, padded_rows, rel, span, terms)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_half(backend, dtype):
    check(backend, 2, 2, 37, 6, 32, 2, ((1, 21),), relative_positions(37, 8, 32), 8, ("c2p", "p2c"), dtype=dtype,
          seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_relative_embeddings(backend):
    """Relative embeddings without gradients (a frozen backbone): q, k, v and prefix gradients still carry the
    c2p/p2c terms."""
    check(backend, 2, 2, 41, 6, 16, None, ((0, 29),), relative_positions(41, 8, 32), 8, ("c2p", "p2c"), seed=9,
          frozen=True)


@pytest.mark.parametrize("backend", ["triton"])
def test_attention_dropout_with_relative_terms(backend):
    """Dropout on the attention probabilities (prefix columns included) with the fused relative path: the
    kernels' Philox masks, the same in the forward and the backward."""
    check(backend, 2, 2, 35, 5, 16, None, ((1, 17),), relative_positions(35), 6, ("c2p", "p2c"), dropout_p=0.3,
          seed=5)


def test_deterministic_mode_is_reproducible_and_agrees():
    """deterministic=True materialises the terms (no atomics): bitwise reproducible, equal to the fused path."""
    kwargs = dict(batch=3, heads=2, seq=37, num_prefix=4, dim=16, tasks=2, padded_rows=((1, 12),),
                  rel=relative_positions(37, 8, 32), span=8, terms=("c2p", "p2c"))
    first = check("triton", deterministic=True, **kwargs)
    second = check("triton", deterministic=True, **kwargs)
    fused = check("triton", **kwargs)
    for name, a, b, c in zip(NAMES, first, second, fused):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)


def test_gradcheck_torch_backend_float64():
    tensors, mask, task_ids, _ = make_inputs(2, 2, 6, 3, 4, torch.float64, tasks=2, padded_rows=((1, 4),))
    pos_key, pos_query = relative_case(2, 4, 3, ("c2p", "p2c"), torch.float64, 7)
    rel = relative_positions(6).to(DEVICE)

    def run(*t):
        bias = DisentangledBias.from_relative_positions(rel, 3, t[5], t[6])
        return prefix_attention(*t[:5], key_padding_mask=mask, task_ids=task_ids, disentangled_bias=bias,
                                backend="torch")

    leaves = [t.detach().clone().requires_grad_() for t in tensors + [pos_key, pos_query]]
    assert torch.autograd.gradcheck(run, leaves)


def test_index_tables_follow_transformers():
    """Row tables of from_relative_positions equal transformers' clamped gathers for every (i, j)."""
    seq, span = 23, 5
    rel = relative_positions(seq, 6, 20)
    index = DisentangledBias.from_relative_positions(rel, span).index.long()
    i = torch.arange(seq)
    slot = i[:, None] - i[None, :] + seq - 1
    assert torch.equal(index[0][slot], (rel + span).clamp(0, 2 * span - 1))
    assert torch.equal(index[1][slot], (span - rel.T).clamp(0, 2 * span - 1))


def _bias(heads=2, dim=16, seq=5, span=3, dtype=torch.float32):
    pos_key, pos_query = relative_case(heads, dim, span, ("c2p", "p2c"), dtype, 0)
    return DisentangledBias.from_relative_positions(relative_positions(seq).to(DEVICE), span, pos_key, pos_query)


@pytest.mark.parametrize("make,error,match", [
    (lambda: _bias(seq=6), ValueError, r"index must be an int32 tensor \[2, 2N - 1\] = \[2, 9\]"),
    (lambda: DisentangledBias(None, None, _bias().index), ValueError, "needs pos_key"),
    (lambda: _bias(heads=3), ValueError, r"pos_key must be \[H=2, R, D=16\]"),
    (lambda: _bias(dtype=torch.float64), TypeError, "pos_key must match q's device and dtype"),
    (lambda: DisentangledBias(_bias().pos_key, _bias(span=2).pos_query, _bias().index), ValueError, "same number"),
    (lambda: DisentangledBias(_bias().pos_key, None, _bias().index + 5), ValueError, r"must lie in \[0, R=6\)"),
    (lambda: _bias().with_embeddings(_bias(span=2).pos_key, None), ValueError, "index reaches row 5"),
    (lambda: "c2p", TypeError, "must be a DisentangledBias"),
])
def test_bad_input(make, error, match):
    tensors, _, _, _ = make_inputs(2, 2, 5, 3, 16, torch.float32)
    with pytest.raises(error, match=match):
        prefix_attention(*tensors, disentangled_bias=make(), backend="torch")


def test_relative_positions_must_depend_on_the_distance_only():
    rel = relative_positions(4)
    rel[1, 2] += 1
    with pytest.raises(ValueError, match="depend on i - j only"):
        DisentangledBias.from_relative_positions(rel, 2)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="large shapes run on a GPU (PTV2_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq,num_prefix,span,buckets", [(256, 64, 256, 256), (200, 16, 64, -1)],
                         ids=["v3-base-buckets", "v1-span<N"])
def test_large_shapes_gpu(dtype, seq, num_prefix, span, buckets):
    """DeBERTa-v3-base shapes (H = 12, D = 64, 2·256 relative rows) on the compiled Triton kernels."""
    rel = relative_positions(seq, buckets, 512)
    check("triton", 4, 12, seq, num_prefix, 64, None, ((1, seq // 3), (3, 1)), rel, span, ("c2p", "p2c"),
          dtype=dtype, seed=11)
