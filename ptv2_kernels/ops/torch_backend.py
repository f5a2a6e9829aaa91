"""Pure-PyTorch prefix attention: the readable statement of SPEC §1 and the CPU default.

The prefix and the sequence are scored as two blocks that share one softmax (one log-sum-exp over
both); a shared prefix ``[H, P, D]`` is broadcast through ``einsum`` (which folds the batch into the
matrix rows), never expanded or concatenated. Like the fused kernels, the forward keeps only the
inputs, the output and the row log-sum-exp, and the backward recomputes the probabilities, so no
``[B, H, N, N + P]`` tensor outlives a call.

Dropout masks come from a ``torch.Generator`` seeded with the call's seed, drawn in a fixed order
(attention ``[B, H, N, P + N]``, then prefix keys and prefix values ``[B, H, P, D]``) and regenerated
in the backward. Per-row prefix dropout and banks make the prefix per row (``[B, H, P, D]``): that is
the one place this path materialises it; the fused kernels never do. Half-precision inputs are
computed in float32 (float64 stays float64) and the results rounded back.
"""

from typing import NamedTuple, Optional

import torch

from .common import Dropout, Options, prefix_rows, reduce_prefix_grad


def _prefix_matmul(x: torch.Tensor, prefix: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x @ prefix^T`` (``transpose``) or ``x @ prefix`` for ``x`` ``[B, H, N, *]`` and a shared
    ``[H, P, D]`` or per-row ``[B, H, P, D]`` prefix."""
    lhs = "bhnd" if transpose else "bhnp"
    rhs = ("bhpd" if prefix.dim() == 4 else "hpd")
    out = "bhnp" if transpose else "bhnd"
    return torch.einsum(f"{lhs},{rhs}->{out}", x, prefix)


def _prefix_grad(ds: torch.Tensor, x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``ds^T @ x`` per row ``[B, H, P, D]`` or summed over the batch ``[H, P, D]``."""
    return torch.einsum("bhnp,bhnd->" + ("bhpd" if per_row else "hpd"), ds, x)


def _dropout_masks(q: torch.Tensor, num_prefix: int, dropout: Dropout):
    """(attention keep ``[B, H, N, P + N]`` or None, prefix key keep, prefix value keep ``[B, H, P, D]``
    or None), regenerated identically from ``dropout.seed``."""
    if not dropout.active:
        return None, None, None
    batch, heads, seq, dim = q.shape
    gen = torch.Generator(device=q.device)
    gen.manual_seed(dropout.seed)

    def keep(shape, p):
        return torch.rand(shape, generator=gen, device=q.device) >= p

    attn = keep((batch, heads, seq, num_prefix + seq), dropout.p) if dropout.p > 0 else None
    if dropout.prefix_p > 0:
        shape = (batch, heads, num_prefix, dim)
        return attn, keep(shape, dropout.prefix_p), keep(shape, dropout.prefix_p)
    return attn, None, None


def _apply_prefix_dropout(rows: torch.Tensor, keep: Optional[torch.Tensor], p: float, batch: int) -> torch.Tensor:
    """Per-row dropout of the prefix rows (a shared ``[H, P, D]`` prefix becomes ``[B, H, P, D]``)."""
    return rows if keep is None else _drop(rows.expand(batch, *rows.shape[-3:]), keep, p)


def _probabilities(q, k, pk, mask, scale, lse=None):
    """Scaled scores of the prefix and sequence blocks turned into probabilities with one shared
    normaliser. Returns (prefix probs, sequence probs, lse); rows without a visible column get
    ``lse = +inf`` and probabilities 0."""
    s_prefix = _prefix_matmul(q, pk, transpose=True) * scale
    s_seq = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s_seq = s_seq.masked_fill(~mask[:, None, None, :], float("-inf"))
    if lse is None:
        lse = torch.logaddexp(torch.logsumexp(s_prefix, -1), torch.logsumexp(s_seq, -1))
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return torch.exp(s_prefix - lse[..., None]), torch.exp(s_seq - lse[..., None]), lse


def _upcast(*tensors):
    """Half precision to float32; float32/float64 unchanged."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def _drop(x, keep, p):
    """Inverted dropout with a given keep mask (None: no dropout)."""
    return x if keep is None else x * keep / (1.0 - p)


class _Blocks(NamedTuple):
    """Everything both passes derive from the inputs: the prefix each row reads (dropout applied), the
    undropped probabilities of both blocks, the row lse and the dropout keep masks (or None)."""

    pk: torch.Tensor
    pv: torch.Tensor
    p_prefix: torch.Tensor
    p_seq: torch.Tensor
    lse: torch.Tensor
    keep_prefix: Optional[torch.Tensor]
    keep_seq: Optional[torch.Tensor]
    keep_k: Optional[torch.Tensor]
    keep_v: Optional[torch.Tensor]


def _blocks(q, k, prefix_k, prefix_v, mask, task_ids, options: Options, lse=None) -> _Blocks:
    batch, num_prefix = q.shape[0], prefix_k.shape[2]
    dropout = options.dropout
    attn_keep, keep_k, keep_v = _dropout_masks(q, num_prefix, dropout)
    pk = _apply_prefix_dropout(prefix_rows(prefix_k, task_ids), keep_k, dropout.prefix_p, batch)
    pv = _apply_prefix_dropout(prefix_rows(prefix_v, task_ids), keep_v, dropout.prefix_p, batch)
    p_prefix, p_seq, lse = _probabilities(q, k, pk, mask, options.scale, lse)
    keep_prefix = keep_seq = None
    if attn_keep is not None:
        keep_prefix, keep_seq = attn_keep[..., :num_prefix], attn_keep[..., num_prefix:]
    return _Blocks(pk, pv, p_prefix, p_seq, lse, keep_prefix, keep_seq, keep_k, keep_v)


class TorchPrefixAttention(torch.autograd.Function):
    """Inputs: q, k, v ``[B, H, N, D]``; prefix_k, prefix_v ``[T, H, P, D]``; bool mask ``[B, N]`` or
    None; task_ids ``[B]`` or None; :class:`Options`."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, mask, task_ids, options: Options):
        inputs = (q, k, v, prefix_k, prefix_v)
        q, k, v, prefix_k, prefix_v = _upcast(*inputs)
        p = options.dropout.p
        x = _blocks(q, k, prefix_k, prefix_v, mask, task_ids, options)
        out = (_prefix_matmul(_drop(x.p_prefix, x.keep_prefix, p), x.pv, transpose=False)
               + torch.matmul(_drop(x.p_seq, x.keep_seq, p), v))
        out = out.to(inputs[0].dtype)
        ctx.save_for_backward(*inputs, mask, task_ids, out, x.lse)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, mask, task_ids, out, lse = ctx.saved_tensors
        in_dtype, prefix_dtype, num_tasks = q.dtype, prefix_k.dtype, prefix_k.shape[0]
        q, k, v, prefix_k, prefix_v, d_out, out = _upcast(q, k, v, prefix_k, prefix_v, d_out, out)
        options = ctx.options
        p, prefix_p, scale = options.dropout.p, options.dropout.prefix_p, options.scale
        x = _blocks(q, k, prefix_k, prefix_v, mask, task_ids, options, lse)

        per_row = x.pk.dim() == 4
        dv = torch.matmul(_drop(x.p_seq, x.keep_seq, p).transpose(-1, -2), d_out)
        dpv = _prefix_grad(_drop(x.p_prefix, x.keep_prefix, p), d_out, per_row)
        delta = (d_out * out).sum(-1, keepdim=True)
        dp_prefix = _drop(_prefix_matmul(d_out, x.pv, transpose=True), x.keep_prefix, p)
        dp_seq = _drop(torch.matmul(d_out, v.transpose(-1, -2)), x.keep_seq, p)
        ds_prefix = x.p_prefix * (dp_prefix - delta)
        ds_seq = x.p_seq * (dp_seq - delta)
        dq = (_prefix_matmul(ds_prefix, x.pk, transpose=False) + torch.matmul(ds_seq, k)) * scale
        dk = torch.matmul(ds_seq.transpose(-1, -2), q) * scale
        dpk = _prefix_grad(ds_prefix, q, per_row) * scale
        dpk = reduce_prefix_grad(_drop(dpk, x.keep_k, prefix_p), task_ids, num_tasks)
        dpv = reduce_prefix_grad(_drop(dpv, x.keep_v, prefix_p), task_ids, num_tasks)
        grads = [g.to(in_dtype) for g in (dq, dk, dv)] + [g.to(prefix_dtype) for g in (dpk, dpv)]
        return (*grads, None, None, None)


def torch_prefix_attention(q, k, v, prefix_k, prefix_v, mask, task_ids, options: Options) -> torch.Tensor:
    """Validated entry point of the torch backend (see :func:`ptv2_kernels.prefix_attention`)."""
    return TorchPrefixAttention.apply(q, k, v, prefix_k, prefix_v, mask, task_ids, options)

