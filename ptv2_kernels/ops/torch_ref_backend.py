"""Pure-PyTorch prefix attention (``backend="torch-ref"``): the readable statement of SPEC §1 and the reference
path.

The old name ``backend="torch"`` runs it on CUDA tensors; ``backend="cpu"`` (and ``auto`` on the CPU) runs it
when the fused C++ kernel (``cpu_backend.py``) cannot be built. The prefix and the sequence are scored as two blocks,
``q @ prefix_k^T`` ``[B, H, N, P]`` and ``q @ k^T`` ``[B, H, N, N]``, laid side by side for one softmax; the
probabilities are then split again and multiplied with ``prefix_v`` and ``v`` separately. The keys and values
themselves are never concatenated, and a shared prefix ``[H, P, D]`` is applied per head with the batch
folded into the matrix rows instead of being expanded. Like the fused kernels, the forward keeps only the
inputs and the output and the backward recomputes the probabilities, so no ``[B, H, N, P + N]`` tensor
outlives a call.

Dropout masks follow RNG contract v2 (``philox.py``): the same masks as the fused kernels for a seed,
regenerated in the backward. Per-row prefix dropout and banks make the prefix per row (``[B, H, P, D]``):
that is the one place this path materialises it; the fused kernels never do. Half-precision inputs are
computed in float32 (float64 stays float64) and the results rounded back.
"""

from typing import NamedTuple, Optional

import torch

from . import philox
from .common import Dropout, Options, prefix_rows, reduce_prefix_grad


def _prefix_matmul(x: torch.Tensor, prefix: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x @ prefix^T`` (``transpose``) or ``x @ prefix`` for ``x`` ``[B, H, N, *]`` and a shared
    ``[H, P, D]`` or per-row ``[B, H, P, D]`` prefix. A shared prefix is applied per head to all rows at
    once (``[H, B*N, *]`` matrices, a view for transformers' layouts), never expanded over the batch."""
    rhs = prefix.transpose(-1, -2) if transpose else prefix
    if prefix.dim() == 4:
        return torch.matmul(x, rhs)
    batch, heads, seq, _ = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(heads, batch * seq, -1), rhs)
    return out.view(heads, batch, seq, -1).transpose(0, 1)


def _prefix_grad(ds: torch.Tensor, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``ds^T @ x`` per row ``[B, H, P, D]`` or summed over the batch ``[H, P, D]``."""
    if per_row:
        return torch.matmul(ds.transpose(-1, -2), x)
    batch, heads, seq, _ = x.shape
    return torch.bmm(ds.transpose(0, 1).reshape(heads, batch * seq, -1).transpose(1, 2),
                     x.transpose(0, 1).reshape(heads, batch * seq, -1))


def _drop(x: torch.Tensor, keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """Inverted dropout with a given keep mask (None: no dropout)."""
    return x if keep is None else x * keep / (1.0 - p)


def _upcast(*tensors):
    """Half precision to float32; float32/float64 unchanged."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _dropout_masks(q: torch.Tensor, num_prefix: int, dropout: Dropout):
    """(attention keep ``[B, H, N, P + N]``, prefix key keep, prefix value keep ``[B, H, P, D]``), each
    None when its rate is 0: RNG contract v2 for ``dropout.seed``."""
    if not dropout.active:
        return None, None, None
    batch, heads, seq, dim = q.shape
    attn = None
    if dropout.p > 0:
        attn = philox.attention_keep(dropout.seed, dropout.p, batch, heads, seq, num_prefix, q.device)
    if dropout.prefix_p == 0:
        return attn, None, None
    keys, values = (philox.prefix_keep(dropout.seed, dropout.prefix_p, batch, heads, num_prefix, dim, stream, q.device)
                    for stream in (philox.PREFIX_KEYS, philox.PREFIX_VALUES))
    return attn, keys, values


class _Prefix(NamedTuple):
    """The prefix each row reads: ``[H, P, D]`` shared or ``[B, H, P, D]`` (bank or prefix dropout,
    with the dropout applied), and the prefix-dropout keep masks (or None)."""

    k: torch.Tensor
    v: torch.Tensor
    keep_k: Optional[torch.Tensor]
    keep_v: Optional[torch.Tensor]


def _prefix(prefix_k, prefix_v, task_ids, batch, keep_k, keep_v, p) -> _Prefix:
    pk, pv = prefix_rows(prefix_k, task_ids), prefix_rows(prefix_v, task_ids)
    if keep_k is not None:
        pk = _drop(pk.expand(batch, *pk.shape[-3:]), keep_k, p)
        pv = _drop(pv.expand(batch, *pv.shape[-3:]), keep_v, p)
    return _Prefix(pk, pv, keep_k, keep_v)


# ----- attention with dropout (and on GPUs): one softmax over the two score blocks side by side -----

def _probabilities(q, k, pk, mask, bias, scale) -> torch.Tensor:
    """Undropped probabilities ``[B, H, N, P + N]``; rows with no visible column are 0."""
    num_prefix = pk.shape[-2]
    q = q * scale
    scores = torch.cat([_prefix_matmul(q, pk, transpose=True), torch.matmul(q, k.transpose(-1, -2))], -1)
    if bias is not None:
        scores[..., num_prefix:] += bias
    if mask is not None:
        scores[..., num_prefix:].masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1)
    if mask is not None and num_prefix == 0:
        probs.nan_to_num_(0.0)
    return probs


def _explicit_forward(q, k, v, prefix: _Prefix, mask, bias, attn_keep, options: Options):
    num_prefix = prefix.k.shape[-2]
    probs = _drop(_probabilities(q, k, prefix.k, mask, bias, options.scale), attn_keep, options.dropout.p)
    return _prefix_matmul(probs[..., :num_prefix], prefix.v, transpose=False) + torch.matmul(probs[..., num_prefix:], v)


def _explicit_backward(d_out, q, k, v, out, prefix: _Prefix, mask, bias, attn_keep, options: Options):
    """(dq, dk, dv, per-row or shared dprefix_k, dprefix_v, dbias = the sequence block's score gradient)."""
    num_prefix, per_row, p = prefix.k.shape[-2], prefix.k.dim() == 4, options.dropout.p
    probs = _probabilities(q, k, prefix.k, mask, bias, options.scale)
    dropped = _drop(probs, attn_keep, p)
    dv = torch.matmul(dropped[..., num_prefix:].transpose(-1, -2), d_out)
    dpv = _prefix_grad(dropped[..., :num_prefix], d_out, per_row)
    del dropped
    # dS = P * (dP - rowsum(dO * O)), built in place in the dP buffer
    ds = torch.cat([_prefix_matmul(d_out, prefix.v, transpose=True), torch.matmul(d_out, v.transpose(-1, -2))], -1)
    if attn_keep is not None:
        ds.masked_fill_(~attn_keep, 0.0).div_(1.0 - p)
    ds.sub_((d_out * out).sum(-1, keepdim=True)).mul_(probs)
    ds_prefix, ds_seq = ds[..., :num_prefix], ds[..., num_prefix:]
    dq = (_prefix_matmul(ds_prefix, prefix.k, transpose=False) + torch.matmul(ds_seq, k)) * options.scale
    dk = torch.matmul(ds_seq.transpose(-1, -2), q) * options.scale
    dpk = _prefix_grad(ds_prefix, q, per_row) * options.scale
    return dq, dk, dv, dpk, dpv, ds_seq


# ----- CPU without attention dropout: PyTorch's fused CPU flash attention on each block (the sequence  -----
# ----- with its padding mask and bias, the prefix broadcast over the batch as a stride-0 view), merged -----
# ----- exactly through the row log-sum-exp (cascade attention); nothing of size [B, H, N, P + N] is    -----
# ----- formed. The CPU flash backward returns no bias gradient: a bias that needs one takes the        -----
# ----- explicit backward.                                                                             -----

_FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"


def flash_merge_available(q: torch.Tensor, options: Options) -> bool:
    """Whether :func:`torch_ref_forward` takes the merged CPU-flash path (and returns an lse)."""
    return (q.device.type == "cpu" and options.dropout.p == 0.0
            and hasattr(torch.ops.aten, _FLASH_CPU + "_backward"))


def _additive_mask(mask, bias, dtype):
    """The sequence block's float mask: the bias plus -inf on padded keys (None if neither)."""
    if mask is None:
        return None if bias is None else bias.to(dtype)
    padding = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype).masked_fill_(
        ~mask[:, None, None, :], float("-inf"))
    return padding if bias is None else padding + bias.to(dtype)


def _blocks(q, k, v, prefix: _Prefix, mask, bias):
    """The two key/value blocks as ``(keys, values, additive mask)``: the sequence, and (if P > 0) the
    prefix as ``[B, H, P, D]`` (a stride-0 view of a shared prefix)."""
    blocks = [(k, v, _additive_mask(mask, bias, q.dtype))]
    if prefix.k.shape[-2] > 0:
        shape = (q.shape[0],) + tuple(prefix.k.shape[-3:])
        blocks.append((prefix.k.expand(shape), prefix.v.expand(shape), None))
    return blocks


def _merged_forward(q, k, v, prefix: _Prefix, mask, bias, options: Options):
    """(out, lse) of the whole row; ``lse = +inf`` marks rows with no visible column (every block's
    weight ``exp(lse_block - lse)`` is then 0, in both passes)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for keys, values, additive_mask in _blocks(q, k, v, prefix, mask, bias):
        out, lse = getattr(torch.ops.aten, _FLASH_CPU)(q, keys, values, attn_mask=additive_mask, scale=options.scale)
        outs.append(out)
        lses.append(lse.to(compute))
    # Out of place: an in-place fill of a tensor that then feeds torch.stack once made inductor's memory
    # planner hand one buffer to two live values when this path was traced (issue 14).
    if mask is not None:  # the CPU kernel reports lse 0 for a row with no visible key
        lses[0] = lses[0].masked_fill(~mask.any(-1)[:, None, None], float("-inf"))
    lse = torch.logaddexp(lses[0], lses[1]) if len(lses) == 2 else lses[0]
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    merged = torch.zeros(q.shape, dtype=compute, device=q.device)
    for out, block_lse in zip(outs, lses):
        merged.addcmul_(out, torch.exp(block_lse - lse)[..., None])
    return merged, lse


def _merged_backward(d_out, q, k, v, out, lse, prefix: _Prefix, mask, bias, options: Options):
    """Each block's gradients come from the CPU flash backward fed the *whole* row's output and lse
    (its probabilities and rowsum(dO * O) are then those of the joint softmax). The prefix gradients
    arrive per row ``[B, H, P, D]`` and are reduced by the caller."""
    backward = getattr(torch.ops.aten, _FLASH_CPU + "_backward")
    lse = lse.to(torch.promote_types(lse.dtype, torch.float32))
    grads = [backward(d_out, q, keys, values, out, lse, 0.0, False, attn_mask=additive_mask, scale=options.scale)
             for keys, values, additive_mask in _blocks(q, k, v, prefix, mask, bias)]
    (dq, dk, dv), prefix_grads = grads[0], grads[1:]
    if not prefix_grads:  # P = 0
        return dq, dk, dv, torch.zeros_like(prefix.k), torch.zeros_like(prefix.v), None
    dq_prefix, dpk, dpv = prefix_grads[0]
    return dq.to(dq_prefix.dtype) + dq_prefix, dk, dv, dpk, dpv, None


def torch_ref_forward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, options: Options):
    """``(out, lse)``: out ``[B, H, N, D]`` in q's dtype; lse ``[B, H, N]`` of the merged CPU-flash path (what
    its backward reuses) or None. Inputs: q, k, v ``[B, H, N, D]``; prefix ``[T, H, P, D]``; bool mask ``[B, N]``
    or None; task_ids ``[B]`` or None; attention bias ``[B, H, N, N]`` or None. Padded rows only, DeBERTa's
    terms materialised into ``bias``: ``relative`` and ``cu_seqlens`` are None (the public op pads packed rows
    with :func:`pad_packed` and materialises the terms)."""
    attn_keep, keep_k, keep_v = _dropout_masks(q, prefix_k.shape[2], options.dropout)
    prefix = _prefix(prefix_k, prefix_v, task_ids, q.shape[0], keep_k, keep_v, options.dropout.prefix_p)
    if flash_merge_available(q, options):
        out, lse = _merged_forward(q, k, v, prefix, mask, bias, options)
    else:
        qc, kc, vc, pk, pv = _upcast(q, k, v, prefix.k, prefix.v)
        out = _explicit_forward(qc, kc, vc, prefix._replace(k=pk, v=pv), mask, bias, attn_keep, options)
        lse = None
    return out.to(q.dtype), lse


def torch_ref_backward(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, out, lse,
                       options: Options, bias_grad: bool, relative_grads=(False, False)):
    """``(dq, dk, dv, dprefix_k, dprefix_v, dbias, None, None)`` for :func:`torch_ref_forward`'s call: dq/dk/dv in
    q's dtype, the prefix gradients ``[T, H, P, D]`` summed per task in the prefix dtype, dbias (bias dtype) if
    ``bias_grad`` else None. The probabilities and dropout masks are recomputed."""
    attn_keep, keep_k, keep_v = _dropout_masks(q, prefix_k.shape[2], options.dropout)
    prefix = _prefix(prefix_k, prefix_v, task_ids, q.shape[0], keep_k, keep_v, options.dropout.prefix_p)
    if lse is not None and not bias_grad:
        grads = _merged_backward(d_out.to(q.dtype).contiguous(), q, k, v, out, lse, prefix, mask, bias, options)
    else:
        qc, kc, vc, pk, pv, d_out, out = _upcast(q, k, v, prefix.k, prefix.v, d_out, out)
        grads = _explicit_backward(d_out, qc, kc, vc, out, prefix._replace(k=pk, v=pv), mask, bias, attn_keep,
                                   options)
    dq, dk, dv, dpk, dpv, dbias = grads
    num_tasks, prefix_p = prefix_k.shape[0], options.dropout.prefix_p
    dpk = reduce_prefix_grad(_drop(dpk, keep_k, prefix_p), task_ids, num_tasks)
    dpv = reduce_prefix_grad(_drop(dpv, keep_v, prefix_p), task_ids, num_tasks)
    dbias = dbias.to(bias.dtype) if bias_grad else None
    return (*(g.to(q.dtype) for g in (dq, dk, dv)), dpk.to(prefix_k.dtype), dpv.to(prefix_k.dtype), dbias, None, None)



def pad_packed(cu_seqlens: torch.Tensor, max_seqlen: int, *packed: torch.Tensor):
    """Packed ``[total, H, D]`` rows (``cu_seqlens``) as padded ``[B, H, max_seqlen, D]`` tensors (a
    differentiable scatter), the ``[B, max_seqlen]`` key padding mask, and the ``(row, position)`` index that
    gathers the real tokens back from a padded ``[B, N, H, D]`` result."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    batch = lengths.shape[0]
    device = cu_seqlens.device
    row = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
    position = torch.arange(packed[0].shape[0], device=device) - cu_seqlens[row]

    def pad(x):
        padded = x.new_zeros(batch, max_seqlen, *x.shape[1:])
        return padded.index_put((row, position), x).transpose(1, 2)

    mask = torch.zeros(batch, max_seqlen, dtype=torch.bool, device=device)
    mask[row, position] = True
    return [pad(x) for x in packed], mask, (row, position)
