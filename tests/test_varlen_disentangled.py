"""``prefix_attention_varlen(..., disentangled_bias=...)`` (packed DeBERTa): outputs and every gradient (q, k, v, the
prefix and both relative embeddings) against the independent float64 reference run row by row on each packed
sequence alone (relative positions within the row), on both backends; plain distances and log buckets, a bank,
an empty row, P = 0; and the deterministic-mode refusal on Triton."""

import pytest
import torch

from ptv2_kernels import DisentangledBias, prefix_attention_varlen

from .reference import reference_attention
from .test_disentangled import reference_relative_bias, relative_positions
from .test_prefix_attention import BACKENDS, DEVICE, max_abs

NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dpos_key", "dpos_query"]


def case(lengths, heads, num_prefix, dim, tasks, span, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = [torch.randn(total, heads, dim, generator=gen) for _ in range(3)]
    bank = () if tasks is None else (tasks,)
    prefix = [torch.randn(*bank, heads, num_prefix, dim, generator=gen) for _ in range(2)]
    embeddings = [torch.randn(heads, 2 * span, dim, generator=gen) for _ in range(2)]
    d_out = torch.randn(total, heads, dim, generator=gen)
    return qkv + prefix + embeddings, d_out


def with_grads(fn, tensors, d_out):
    leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(d_out.to(out.device, out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,num_prefix,tasks,buckets,span", [
    ([13, 1, 40, 7], 5, None, (-1, -1), 6),
    ([9, 0, 33], 0, None, (8, 64), 8),
    ([12, 30, 7], 4, 3, (-1, -1), 40),
], ids=["span<N", "buckets-P=0-empty-row", "bank-span>N"])
def test_packed_relative_terms_match_each_row_alone(backend, lengths, num_prefix, tasks, buckets, span):
    heads, dim, scale = 2, 16, 0.2
    tensors, d_out = case(lengths, heads, num_prefix, dim, tasks, span)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(DEVICE)
    task_ids = None if tasks is None else (torch.arange(len(lengths)) % tasks).to(DEVICE)
    rel = relative_positions(max(lengths), *buckets)

    def packed(q, k, v, prefix_k, prefix_v, pos_key, pos_query):
        bias = DisentangledBias.from_relative_positions(rel.to(DEVICE), span, pos_key, pos_query)
        return prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens=cu_seqlens, task_ids=task_ids,
                                       scale=scale, disentangled_bias=bias, backend=backend)

    def reference(q, k, v, prefix_k, prefix_v, pos_key, pos_query):
        """Each sequence alone as a padded batch of one, in float64 (relative positions of its own length)."""
        rows = []
        for b, (start, end) in enumerate(zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])):
            if end == start:
                continue
            one = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            pk, pv = (p if tasks is None else p[b % tasks] for p in (prefix_k, prefix_v))
            bias = reference_relative_bias(*one[:2], pos_key, pos_query, rel[:end - start, :end - start], span, scale)
            rows.append(reference_attention(*one, pk, pv, scale=scale, bias=bias)[0].transpose(0, 1))
        return torch.cat(rows)

    got = with_grads(packed, tensors, d_out)
    ref = with_grads(reference, [t.double() for t in tensors], d_out.double())
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape and torch.isfinite(g).all(), name
        err = max_abs(g.double() - r.to(g.device))
        assert err <= 1e-4 * max(1.0, max_abs(r)), f"{name}: error {err:.3g}"


def test_deterministic_triton_refuses_relative_embedding_gradients():
    tensors, _ = case([5, 3], 2, 2, 16, None, 4)
    q, k, v, pk, pv, pos_key, pos_query = (t.to(DEVICE) for t in tensors)
    bias = DisentangledBias.from_relative_positions(relative_positions(5).to(DEVICE), 4, pos_key.requires_grad_(),
                                                    pos_query)
    cu_seqlens = torch.tensor([0, 5, 8], device=DEVICE)
    with pytest.raises(ValueError, match="deterministic"):
        prefix_attention_varlen(q, k, v, pk, pv, cu_seqlens=cu_seqlens, disentangled_bias=bias, backend="triton",
                                deterministic=True)
    with torch.no_grad():  # inference needs no relative-embedding gradient: allowed
        out = prefix_attention_varlen(q, k, v, pk, pv, cu_seqlens=cu_seqlens, disentangled_bias=bias,
                                      backend="triton", deterministic=True)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match=r"disentangled_bias.index must be an int32 tensor \[2, 2N - 1\] = \[2, 9\]"):
        prefix_attention_varlen(q, k, v, pk, pv, cu_seqlens=cu_seqlens, max_seqlen=5,
                                disentangled_bias=DisentangledBias.from_relative_positions(
                                    relative_positions(4).to(DEVICE), 4, pos_key, pos_query))
