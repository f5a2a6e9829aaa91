"""Host side of the Triton backend: launches the kernels of ``kernels/prefix_attention_triton.py`` and
wraps them in an autograd Function. Inputs arrive validated (``prefix_attention.py``).

q, k, v are either padded ``[B, H, N, D]`` or, with ``cu_seqlens``, packed ``[total_tokens, H, D]``
(then ``options.max_seqlen`` is N, the longest row). DeBERTa's relative terms arrive as ``rel``:
``(pos_key, pos_query, index)`` of a :class:`~ptv2_kernels.ops.disentangled.DisentangledBias` or None."""

from typing import Optional

import torch
import triton

from ..kernels import prefix_attention_triton as kernels
from .common import Dropout, Options

LOG2_E = 1.4426950408889634


def interpreting() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.prefix_attention_fwd_kernel, InterpretedFunction)


def _dropout_args(dropout: Dropout) -> dict:
    """Kernel arguments of the RNG contract: keep iff ``(philox >> 8) >= round(p * 2**24)``."""
    return dict(
        seed=dropout.seed,
        threshold=round(dropout.p * (1 << 24)),
        drop_scale=1.0 / (1.0 - dropout.p),
        prefix_threshold=round(dropout.prefix_p * (1 << 24)),
        prefix_scale=1.0 / (1.0 - dropout.prefix_p),
        ATTN_DROPOUT=dropout.p > 0,
        PREFIX_DROPOUT=dropout.prefix_p > 0,
    )


def _tiling(q: torch.Tensor, rel) -> dict:
    """Tile sizes, warps and the dot precision for this dtype/head_dim. The interpreter gets small tiles
    so that CI's small shapes still span several tiles. BLOCK_M == BLOCK_N keeps the relative terms'
    window (BLOCK_M + BLOCK_N distances) a power of two; its ``[BLOCK_M, 2 BLOCK_N]`` float32 products
    get twice the warps."""
    interp = interpreting()
    block = 32 if interp else 64
    return dict(
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        DOT_FP32=q.dtype == torch.float32 or (interp and q.dtype == torch.bfloat16),
        num_warps=8 if rel is not None else 4,
    )


def _strides(**tensors: torch.Tensor) -> dict:
    """Kernel arguments ``stride_<name>b/h/n`` of padded ``[B, H, N, D]`` or packed ``[total, H, D]``
    (batch stride 0, token stride as sequence stride) tensors passed by name."""
    def bhn(t):
        return t.stride()[:3] if t.dim() == 4 else (0, t.stride(1), t.stride(0))

    return {f"stride_{name}{axis}": s for name, t in tensors.items() for axis, s in zip("bhn", bhn(t))}


def _empty_like_qkv(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like q: padded ``[B, H, N, D]`` stored as ``[B, N, H, D]`` (what
    transformers reshapes back to hidden states without a copy), or contiguous packed ``[total, H, D]``."""
    if q.dim() == 3:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    batch, heads, seq, dim = q.shape
    return q.new_empty(batch, seq, heads, dim).transpose(1, 2)


def _sizes(q, cu_seqlens, options: Options):
    """(B, H, N, D) of a padded or packed call."""
    if cu_seqlens is None:
        return tuple(q.shape)
    return cu_seqlens.shape[0] - 1, q.shape[1], options.max_seqlen, q.shape[2]


def _common_args(q, prefix_k, mask, task_ids, bias, rel, cu_seqlens, options: Options):
    dummy = q.new_empty(0, dtype=torch.int64)
    batch, heads, seq, dim = _sizes(q, cu_seqlens, options)
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    pos_key, pos_query, rel_index = rel if rel is not None else (None, None, None)
    return dict(
        PosK=dummy if pos_key is None else pos_key,
        PosQ=dummy if pos_query is None else pos_query,
        RelIndex=dummy if rel_index is None else rel_index,
        R=0 if rel is None else (pos_key if pos_key is not None else pos_query).shape[1],
        HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None,
        TaskIds=dummy if task_ids is None else task_ids,
        Mask=dummy if mask is None else mask.view(torch.uint8),
        Bias=dummy if bias is None else bias,
        CuSeqlens=dummy if cu_seqlens is None else cu_seqlens,
        **dict(zip(("stride_bb", "stride_bh", "stride_bm", "stride_bn"), bias_strides)),
        H=heads, N=seq, P=prefix_k.shape[2], D=dim,
        HAS_MASK=mask is not None, HAS_TASKS=task_ids is not None, HAS_BIAS=bias is not None,
        VARLEN=cu_seqlens is not None,
    )


def _forward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, rel, cu_seqlens, options: Options):
    batch, heads, seq, _ = _sizes(q, cu_seqlens, options)
    out = _empty_like_qkv(q)
    lse = torch.empty(batch, heads, seq, device=q.device, dtype=torch.float32)
    tiling = _tiling(q, rel)
    grid = (triton.cdiv(seq, tiling["BLOCK_M"]), batch * heads)
    kernels.prefix_attention_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, Out=out, Lse=lse, **_strides(q=q, k=k, v=v, o=out),
        scale_log2=options.scale * LOG2_E,
        **_common_args(q, prefix_k, mask, task_ids, bias, rel, cu_seqlens, options),
        **_dropout_args(options.dropout), **tiling,
    )
    return out, lse


def _distance_grad(rel_emb: Optional[torch.Tensor], heads: int, seq: int, dim: int) -> Optional[torch.Tensor]:
    """Float32 ``[H, 2N - 1, D]`` per-distance gradient accumulator of a relative embedding (None if absent)."""
    if rel_emb is None:
        return None
    return torch.zeros(heads, 2 * seq - 1, dim, device=rel_emb.device, dtype=torch.float32)


def _fold_distances(grad: Optional[torch.Tensor], rel_emb: Optional[torch.Tensor], index: torch.Tensor,
                    scale: float) -> Optional[torch.Tensor]:
    """Per-distance gradient ``[H, 2N - 1, D]`` summed into the embedding rows each distance reads, times
    the score scale, in the embedding's dtype."""
    if grad is None:
        return None
    rows = torch.zeros(rel_emb.shape, device=grad.device, dtype=torch.float32)
    return rows.index_add_(1, index.long(), grad).mul_(scale).to(rel_emb.dtype)


def _backward(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, rel, cu_seqlens, out, lse, options: Options,
              bias_grad: bool, emb_grads=(False, False)):
    """(dq, dk, dv, float32 dprefix_k, float32 dprefix_v, dbias or None, dpos_key or None, dpos_query or None);
    ``emb_grads``: whether pos_key / pos_query need their gradients."""
    batch, heads, seq, dim = _sizes(q, cu_seqlens, options)
    num_prefix = prefix_k.shape[2]
    tiling = _tiling(q, rel)
    common = _common_args(q, prefix_k, mask, task_ids, bias, rel, cu_seqlens, options)
    pos_key, pos_query, rel_index = rel if rel is not None else (None, None, None)
    dist_key, dist_query = (_distance_grad(t if wanted else None, heads, seq, dim)
                            for t, wanted in zip((pos_key, pos_query), emb_grads))
    dropout = _dropout_args(options.dropout)
    scales = dict(scale=options.scale, scale_log2=options.scale * LOG2_E)

    delta = torch.empty_like(lse)
    rows_grid = (triton.cdiv(seq, tiling["BLOCK_M"]), batch * heads)
    kernels.prefix_attention_bwd_preprocess_kernel[rows_grid](
        out, d_out, delta, CuSeqlens=common["CuSeqlens"], **_strides(o=out, g=d_out), H=heads, N=seq, D=dim,
        VARLEN=common["VARLEN"], BLOCK_M=tiling["BLOCK_M"], BLOCK_D=tiling["BLOCK_D"],
    )
    dummy = q.new_empty(0, dtype=torch.float32)
    dq = _empty_like_qkv(q)
    kernels.prefix_attention_bwd_dq_kernel[rows_grid](
        q, k, v, prefix_k, prefix_v, DOut=d_out, Lse=lse, Delta=delta, DQ=dq,
        DPosK=dummy if dist_key is None else dist_key, C2P_GRAD=dist_key is not None,
        **_strides(q=q, k=k, v=v, g=d_out, dq=dq), **scales, **common, **dropout, **tiling,
    )

    dk, dv = _empty_like_qkv(k), _empty_like_qkv(v)
    dpk = torch.zeros(prefix_k.shape, device=q.device, dtype=torch.float32)
    dpv = torch.zeros_like(dpk)
    dbias = torch.empty(batch, heads, seq, seq, device=q.device, dtype=bias.dtype) if bias_grad else None
    prefix_blocks = triton.cdiv(num_prefix, tiling["BLOCK_N"])
    seq_blocks = triton.cdiv(seq, tiling["BLOCK_N"])

    def launch_dkdv(grid, prefix_programs, deterministic):
        kernels.prefix_attention_bwd_dkdv_kernel[grid](
            q, k, v, prefix_k, prefix_v, DOut=d_out, Lse=lse, Delta=delta, DK=dk, DV=dv, DPK=dpk, DPV=dpv,
            DBias=dpk if dbias is None else dbias, BIAS_GRAD=bias_grad,
            DPosQ=dummy if dist_query is None else dist_query, P2C_GRAD=dist_query is not None,
            **_strides(q=q, k=k, v=v, g=d_out, dk=dk, dv=dv), B=batch, PREFIX_BLOCKS=prefix_programs,
            DETERMINISTIC=deterministic, **scales, **common, **dropout, **tiling,
        )

    if options.deterministic:
        launch_dkdv((seq_blocks, batch * heads), 0, False)
        if prefix_blocks:
            launch_dkdv((prefix_blocks, heads), prefix_blocks, True)
    else:
        launch_dkdv((prefix_blocks + seq_blocks, batch * heads), prefix_blocks, False)
    index = (None, None) if rel is None else rel_index
    return (dq, dk, dv, dpk, dpv, dbias, _fold_distances(dist_key, pos_key, index[0], options.scale),
            _fold_distances(dist_query, pos_query, index[1], options.scale))


class TritonPrefixAttention(torch.autograd.Function):
    """Inputs: q, k, v ``[B, H, N, D]`` or packed ``[total, H, D]`` (unit last stride); prefix_k,
    prefix_v contiguous ``[T, H, P, D]``; bool mask ``[B, N]`` (contiguous) or None; task_ids ``[B]``
    or None; attention bias ``[B, H, N, N]`` (any strides) or None; the relative terms' pos_key,
    pos_query (contiguous ``[H, R, D]`` or None) and index (int32 ``[2, 2N - 1]``, None without them);
    cu_seqlens ``[B + 1]`` (packed rows) or None; :class:`Options`."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index, cu_seqlens,
                options: Options):
        rel = None if rel_index is None else (pos_key, pos_query, rel_index)
        out, lse = _forward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, rel, cu_seqlens, options)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index,
                              cu_seqlens, out, lse)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index, cu_seqlens, out, lse = (
            ctx.saved_tensors)
        if d_out.stride(-1) != 1:
            d_out = d_out.contiguous()
        rel = None if rel_index is None else (pos_key, pos_query, rel_index)
        dq, dk, dv, dpk, dpv, dbias, dpos_key, dpos_query = _backward(
            d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, rel, cu_seqlens, out, lse, ctx.options,
            bias_grad=ctx.needs_input_grad[7], emb_grads=ctx.needs_input_grad[8:10])
        return (dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype), None, None, dbias, dpos_key, dpos_query,
                None, None, None)


def triton_prefix_attention(q, k, v, prefix_k, prefix_v, mask: Optional[torch.Tensor],
                            task_ids: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            options: Options, cu_seqlens: Optional[torch.Tensor] = None,
                            disentangled=None) -> torch.Tensor:
    """Validated entry point of the Triton backend (see :func:`ptv2_kernels.prefix_attention` and
    :func:`ptv2_kernels.prefix_attention_varlen`); ``disentangled`` a checked DisentangledBias or None."""
    rel = (None, None, None) if disentangled is None else disentangled.tensors
    return TritonPrefixAttention.apply(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, *rel, cu_seqlens, options)
