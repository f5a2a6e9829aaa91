"""prefix_attention_varlen: packed sequences equal the padded op on their real tokens (outputs and all
gradients) on both backends, with banks, empty rows, dropout masks identical to the padded kernels'."""

import pytest
import torch

from ptv2_kernels import prefix_attention, prefix_attention_varlen

from .test_prefix_attention import DEVICE, run_with_grads

BACKENDS = ["torch", "triton"]


def packed_case(lengths, heads, num_prefix, dim, tasks=None, seed=0):
    """Random packed q/k/v (views of one ``[total, 3, H, D]`` projection), prefix, cu_seqlens, task_ids,
    gradient, and the index of every packed token in the padded ``[B, N]`` layout."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, dim, generator=gen)
    bank = () if tasks is None else (tasks,)
    prefix = [torch.randn(*bank, heads, num_prefix, dim, generator=gen) for _ in range(2)]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    task_ids = None if tasks is None else torch.arange(len(lengths)) % tasks
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(total) - cu_seqlens[row]
    d_out = torch.randn(total, heads, dim, generator=gen)
    to = (lambda t: None if t is None else t.to(DEVICE))
    return ([qkv[:, i].to(DEVICE) for i in range(3)] + [to(p) for p in prefix], to(cu_seqlens), to(task_ids),
            to(d_out), row, position)


def padded(x, row, position, batch, seq):
    """Packed ``[total, H, D]`` to padded ``[B, H, N, D]``, or a packed ``[total]`` flag to a ``[B, N]`` mask."""
    out = x.new_zeros(batch, seq, *x.shape[1:])
    out[row, position] = x
    return out.transpose(1, 2) if x.dim() == 3 else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths,num_prefix,tasks", [
    ([37, 5, 64, 1], 20, None),
    ([9, 0, 33], 0, None),
    ([12, 30, 7], 11, 3),
], ids=["odd-lengths", "P=0-empty-row", "bank"])
def test_packed_equals_padded(backend, lengths, num_prefix, tasks):
    tensors, cu_seqlens, task_ids, d_out, row, position = packed_case(lengths, 2, num_prefix, 32, tasks)
    batch, seq = len(lengths), max(lengths)
    got = run_with_grads(prefix_attention_varlen, tensors, d_out, cu_seqlens=cu_seqlens, task_ids=task_ids,
                         backend=backend)
    mask = padded(torch.ones(sum(lengths), dtype=torch.bool), row, position, batch, seq).to(DEVICE)
    pad = [padded(t.cpu(), row, position, batch, seq).to(DEVICE) for t in tensors[:3] + [d_out]]
    ref = run_with_grads(prefix_attention, pad[:3] + tensors[3:], pad[3], key_padding_mask=mask, task_ids=task_ids,
                         backend="torch")
    unpack = (lambda t: t.transpose(1, 2)[row, position])
    for name, g, r in zip(["out", "dq", "dk", "dv"], got[:4], ref[:4]):
        torch.testing.assert_close(g, unpack(r), rtol=1e-4, atol=2e-5, msg=name)
    for name, g, r in zip(["dprefix_k", "dprefix_v"], got[4:], ref[4:]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5, msg=name)


def test_packed_dropout_uses_the_padded_masks():
    """The Triton kernels draw the same masks for a packed row as for the same padded row."""
    from ptv2_kernels.ops.common import Dropout, Options
    from ptv2_kernels.ops.library import attend

    lengths = [21, 9]
    tensors, cu_seqlens, _, d_out, row, position = packed_case(lengths, 2, 7, 16, seed=1)
    dropout = Dropout(p=0.3, prefix_p=0.2, seed=99)
    bank = [t.unsqueeze(0) for t in tensors[3:]]
    packed = Options(scale=0.25, dropout=dropout, max_seqlen=21)
    no_bias = (None,) * 4  # attn_bias and the disentangled terms
    got = run_with_grads(lambda *t: attend("triton", *t, None, None, *no_bias, cu_seqlens, packed),
                         tensors[:3] + bank, d_out)
    mask = padded(torch.ones(sum(lengths), dtype=torch.bool), row, position, 2, 21).to(DEVICE)
    pad = [padded(t.cpu(), row, position, 2, 21).to(DEVICE) for t in tensors[:3] + [d_out]]
    plain = Options(scale=0.25, dropout=dropout)
    ref = run_with_grads(lambda *t: attend("triton", *t, mask, None, *no_bias, None, plain),
                         pad[:3] + bank, pad[3])
    unpack = (lambda t: t.transpose(1, 2)[row, position])
    for name, g, r in zip(["out", "dq", "dk", "dv"], got[:4], ref[:4]):
        torch.testing.assert_close(g, unpack(r), rtol=1e-5, atol=1e-6, msg=name)
    for name, g, r in zip(["dprefix_k", "dprefix_v"], got[4:], ref[4:]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cu,max_seqlen,error,words", [
    (torch.tensor([0, 5, 3, 10]), None, ValueError, "without decreasing"),
    (torch.tensor([0, 5, 9]), None, ValueError, "from 0 to total_tokens = 10"),
    (torch.tensor([0.0, 10.0]), None, TypeError, "int32 or int64"),
    (torch.tensor([10]), None, ValueError, "[B + 1] with B >= 1"),
    (torch.tensor([0, 4, 10]), 5, ValueError, "max_seqlen must be an int >= the longest row (6)"),
])
def test_bad_cu_seqlens(cu, max_seqlen, error, words):
    q = torch.randn(10, 2, 16, device=DEVICE)
    prefix = torch.randn(2, 3, 16, device=DEVICE)
    with pytest.raises(error) as info:
        prefix_attention_varlen(q, q, q, prefix, prefix, cu_seqlens=cu.to(DEVICE), max_seqlen=max_seqlen)
    assert words in str(info.value)


def test_packed_needs_3d():
    q = torch.randn(1, 10, 2, 16)
    with pytest.raises(ValueError, match=r"q must be \[total_tokens, H, D\]"):
        prefix_attention_varlen(q, q, q, torch.randn(2, 3, 16), torch.randn(2, 3, 16), cu_seqlens=torch.tensor([0, 10]))
