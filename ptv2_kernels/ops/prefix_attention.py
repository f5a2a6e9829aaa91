"""``prefix_attention`` (SPEC §3) and its packed variable-length twin ``prefix_attention_varlen``: the
public ops. Validate every argument, normalise the prefix to a ``[T, H, P, D]`` buffer, draw the
dropout seed and dispatch to a backend."""

import math
from typing import Optional

import torch

from .common import Dropout, Options
from .disentangled import DisentangledBias, bias_matrix, check_disentangled

BACKENDS = ("auto", "triton", "cuda", "torch", "torch-ref")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
KERNEL_HEAD_DIMS = range(16, 129)


def _check_qkv(q, k, v, layout="[B, H, N, D]"):
    """q, k, v of one shape in ``layout`` (padded ``[B, H, N, D]`` or packed ``[total_tokens, H, D]``;
    H is dimension 1 and D the last in both), non-empty, unit last stride."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != layout.count(",") + 1:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head_dim) dimension, got strides "
                             f"{tuple(t.stride())}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)} ({layout}), got {tuple(t.shape)}")
    if q.numel() == 0:
        raise ValueError(f"q must have non-empty dimensions {layout}, got shape {tuple(q.shape)}")


def _check_prefix(q, prefix_k, prefix_v):
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be [H, P, D] or a bank [T, H, P, D], got shape {tuple(t.shape)}")
    heads, dim = q.shape[1], q.shape[-1]
    if prefix_k.shape[-3] != heads or prefix_k.shape[-1] != dim:
        raise ValueError(f"prefix_k must be [H={heads}, P, D={dim}] (or [T, {heads}, P, {dim}]) to match q, "
                         f"got shape {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have the shape of prefix_k {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    if prefix_k.dim() == 4 and prefix_k.shape[0] == 0:
        raise ValueError("prefix_k is a bank with zero tasks ([T, H, P, D] with T = 0)")


def _check_common(q, tensors, backend):
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must share one device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v, prefix_k and prefix_v "
                            "must share one dtype (cast the prefix to the activations' dtype)")
    allowed = TORCH_DTYPES if backend == "torch" else KERNEL_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; backend={backend!r} supports {', '.join(map(str, allowed))}")
    if backend != "torch" and q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head_dim (last dim of q) must be in 16..128 for backend={backend!r}, got {q.shape[-1]}")


def _check_mask(q, mask):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got dtype {mask.dtype}")
    if mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"key_padding_mask must be [B, N] = {(q.shape[0], q.shape[2])}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}")
    return mask.contiguous()


def _check_task_ids(q, batch, prefix_k, task_ids):
    is_bank = prefix_k.dim() == 4
    if task_ids is None:
        if is_bank:
            raise ValueError(f"task_ids ([B] int64) is required with a prefix bank [T, H, P, D], got prefix_k "
                             f"{tuple(prefix_k.shape)}")
        return None
    if not is_bank:
        raise ValueError("task_ids was given but prefix_k is a single prefix [H, P, D]; pass a bank [T, H, P, D]")
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids must be a torch.Tensor, got {type(task_ids).__name__}")
    if task_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"task_ids must be an int64 (or int32) tensor, got dtype {task_ids.dtype}")
    if task_ids.shape != (batch,):
        raise ValueError(f"task_ids must be [B] = [{batch}], got shape {tuple(task_ids.shape)}")
    if task_ids.device != q.device:
        raise ValueError(f"task_ids is on {task_ids.device} but q is on {q.device}")
    num_tasks = prefix_k.shape[0]
    low, high = int(task_ids.min()), int(task_ids.max())
    if low < 0 or high >= num_tasks:
        raise ValueError(f"task_ids must lie in [0, {num_tasks}) for a bank of {num_tasks} tasks, got values in "
                         f"[{low}, {high}]")
    return task_ids.to(torch.int64).contiguous()


def _check_bias(q, bias):
    """``[B, H, N, N]`` (or broadcastable to it), floating, on q's device; returned expanded (a view)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"attn_bias must be a floating-point tensor, got dtype {bias.dtype}")
    batch, heads, seq, _ = q.shape
    if bias.device != q.device:
        raise ValueError(f"attn_bias is on {bias.device} but q is on {q.device}")
    try:
        return bias.expand(batch, heads, seq, seq)
    except RuntimeError:
        raise ValueError(f"attn_bias must be [B, H, N, N] = {(batch, heads, seq, seq)} or broadcastable to it, "
                         f"got {tuple(bias.shape)}") from None


def _check_probability(name, p):
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError(f"{name} must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: ``auto`` is triton on a GPU and torch on the CPU. ``torch-ref`` (the
    pure-PyTorch composition) is validated as and returned as ``torch``; the torch branch of the dispatch
    picks the fused CPU kernel or the composition (:func:`~ptv2_kernels.ops.cpu_backend.use_cpu_kernel`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch-ref":
        return "torch"
    if backend == "auto":  # triton until the CUDA kernels have been validated on a GPU
        return "triton" if device.type == "cuda" else "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got q on {device}")
        from .cuda_backend import cuda_status

        available, reason = cuda_status()
        if not available:
            raise RuntimeError(reason)
    if backend == "triton" and device.type == "cpu":
        from .triton_backend import interpreting

        if not interpreting():
            raise RuntimeError("backend='triton' on CPU tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported (ptv2_kernels does this itself "
                               "on machines without a GPU when it is imported first)")
    return backend


def _check_cu_seqlens(q, cu_seqlens, max_seqlen):
    """``cu_seqlens`` ``[B + 1]`` int32/int64 from 0 to total_tokens, non-decreasing; returns it as
    contiguous int64 and ``max_seqlen`` (the longest row, computed if None, checked if given)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to total_tokens = {q.shape[0]} without decreasing, got "
                         f"{bounds if len(bounds) <= 8 else bounds[:4] + ['...'] + bounds[-2:]}")
    longest = max(lengths)
    if max_seqlen is None:
        return cu_seqlens.to(torch.int64).contiguous(), longest
    if not isinstance(max_seqlen, int) or max_seqlen < longest:
        raise ValueError(f"max_seqlen must be an int >= the longest row ({longest}), got {max_seqlen!r}")
    return cu_seqlens.to(torch.int64).contiguous(), max_seqlen


def _seed(dropout_p: float, prefix_dropout_p: float) -> int:
    """A fresh 63-bit seed from torch's default CPU generator (so ``torch.manual_seed`` governs it)."""
    if dropout_p == 0.0 and prefix_dropout_p == 0.0:
        return 0
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _options(head_dim, scale, dropout_p, prefix_dropout_p, deterministic, max_seqlen=0) -> Options:
    dropout_p = _check_probability("dropout_p", dropout_p)
    prefix_dropout_p = _check_probability("prefix_dropout_p", prefix_dropout_p)
    return Options(
        scale=_check_scale(scale, head_dim),
        dropout=Dropout(dropout_p, prefix_dropout_p, _seed(dropout_p, prefix_dropout_p)),
        deterministic=bool(deterministic) or torch.are_deterministic_algorithms_enabled(),
        max_seqlen=max_seqlen,
    )


def _bank(prefix_k, prefix_v, backend):
    """The prefix as a ``[T, H, P, D]`` bank (T = 1 for a single prefix; a view), contiguous for the
    fused kernels (a copy only if it was not: the prefix is small)."""
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    if backend != "torch":
        prefix_k, prefix_v = prefix_k.contiguous(), prefix_v.contiguous()
    return prefix_k, prefix_v


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    task_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    prefix_dropout_p: float = 0.0,
    backend: str = "auto",
    deterministic: bool = False,
    attn_bias: Optional[torch.Tensor] = None,
    disentangled_bias: Optional[DisentangledBias] = None,
) -> torch.Tensor:
    """Attention of ``q`` over a learned prefix followed by the sequence, without concatenating them.

    Args:
        q, k, v: ``[B, H, N, D]``; any batch/head/sequence strides (views of transformers' ``[B, N, H, D]``
            projections are read in place), unit last stride.
        prefix_k, prefix_v: one layer's compact prefix ``[H, P, D]`` shared by every row, or a bank
            ``[T, H, P, D]`` indexed per row by ``task_ids``. P may be 0.
        key_padding_mask: ``[B, N]`` bool, True = real token. Prefix columns are always visible. A row
            with no visible column at all (P = 0, fully padded) outputs zeros.
        task_ids: ``[B]`` integer task of each row; required with (and only with) a bank.
        scale: score scale, default ``1/sqrt(D)``.
        dropout_p: attention-probability dropout, prefix columns included (pass 0 in eval).
        prefix_dropout_p: P-Tuning v2 prefix dropout: an independent mask per batch row over the prefix
            K/V elements, drawn in-kernel (no ``[B, H, P, D]`` tensor on the fused backends).
        backend: ``"auto"`` (triton on a GPU, torch on the CPU), ``"triton"`` (on CPU tensors under
            the Triton interpreter), ``"cuda"``, ``"torch"`` (CPU tensors: the fused C++ kernel; CUDA tensors,
            or no C++ compiler: the composition) or ``"torch-ref"`` (the pure-PyTorch composition, no
            concatenation).
        deterministic: reduce the prefix gradients over the batch in a fixed order instead of with
            atomics (also on when ``torch.use_deterministic_algorithms(True)``); ``disentangled_bias`` is then
            materialised (its fused gradient uses atomics).
        attn_bias: optional ``[B, H, N, N]`` (or broadcastable) bias added to the scaled scores of the
            sequence columns only (prefix columns get none), e.g. DeBERTa's c2p + p2c relative-position
            terms; differentiable.
        disentangled_bias: DeBERTa's c2p/p2c as a :class:`DisentangledBias` (projected relative embeddings
            ``[H, R, D]`` and distance-to-row tables), added inside ``scale`` to the sequence columns only.
            The Triton kernels and the fused CPU kernel gather the terms per tile, forward and backward,
            without a ``[B, H, N, N]`` tensor; ``torch-ref`` and Triton's ``deterministic`` reductions
            materialise them as an ``attn_bias``. Differentiable in its embeddings.

    Returns:
        ``[B, H, N, D]`` in q's dtype (fused backends store it as ``[B, N, H, D]`` underneath).
        Differentiable in q, k, v, prefix_k and prefix_v; prefix gradients are summed over the rows
        that used them (per task for a bank), accumulated in float32.
    """
    _check_qkv(q, k, v)
    _check_prefix(q, prefix_k, prefix_v)
    requested, backend = backend, resolve_backend(backend, q.device)
    _check_common(q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}, backend)
    mask = _check_mask(q, key_padding_mask)
    task_ids = _check_task_ids(q, q.shape[0], prefix_k, task_ids)
    bias = _check_bias(q, attn_bias)
    disentangled = check_disentangled(q, disentangled_bias)
    options = _options(q.shape[-1], scale, dropout_p, prefix_dropout_p, deterministic)
    prefix_k, prefix_v = _bank(prefix_k, prefix_v, backend)
    if backend == "cuda":
        if bias is not None or disentangled is not None:
            raise ValueError("attn_bias and disentangled_bias are not supported by backend='cuda' yet; use "
                             "backend='triton' or 'torch'")
        from .cuda_backend import cuda_prefix_attention

        return cuda_prefix_attention(q, k, v, prefix_k, prefix_v, mask, task_ids, options)
    cpu_kernel = False
    if backend == "torch":
        from .cpu_backend import use_cpu_kernel

        cpu_kernel = use_cpu_kernel(requested, q.device)
    if disentangled is not None and not cpu_kernel and (backend == "torch" or options.deterministic):
        # the per-distance atomics of the fused gradient are not reproducible: deterministic runs materialise
        # (the CPU kernel gathers the terms itself and reduces in a fixed order)
        relative = bias_matrix(q, k, disentangled, options.scale)
        bias, disentangled = relative if bias is None else bias + relative, None
    if cpu_kernel:
        from .cpu_backend import cpu_prefix_attention

        return cpu_prefix_attention(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, options, disentangled)
    if backend == "torch":
        from .torch_backend import torch_prefix_attention

        return torch_prefix_attention(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, options)
    from .triton_backend import triton_prefix_attention

    return triton_prefix_attention(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, options,
                                   disentangled=disentangled)


def prefix_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    max_seqlen: Optional[int] = None,
    task_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    prefix_dropout_p: float = 0.0,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """:func:`prefix_attention` on sequences packed without padding (FlashAttention's varlen layout).

    Args:
        q, k, v: packed ``[total_tokens, H, D]`` (strided views accepted, unit last stride); row ``b`` is
            tokens ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` and attends only to its own tokens and its
            prefix.
        cu_seqlens: ``[B + 1]`` int32/int64 cumulative lengths, from 0 to total_tokens.
        max_seqlen: the longest row (computed from ``cu_seqlens`` if None).
        Other arguments as :func:`prefix_attention` (no padding mask: there is no padding; no bias).
        Dropout masks use the same counters as the padded op (query/column positions within the row).

    Returns:
        ``[total_tokens, H, D]``, differentiable in q, k, v, prefix_k and prefix_v. The Triton backend and
        the fused CPU kernel (``backend="torch"``) read the packed tokens in place; ``torch-ref`` pads, attends
        and unpacks.
    """
    _check_qkv(q, k, v, layout="[total_tokens, H, D]")
    _check_prefix(q, prefix_k, prefix_v)
    requested, backend = backend, resolve_backend(backend, q.device)
    _check_common(q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}, backend)
    cu_seqlens, max_seqlen = _check_cu_seqlens(q, cu_seqlens, max_seqlen)
    task_ids = _check_task_ids(q, cu_seqlens.shape[0] - 1, prefix_k, task_ids)
    options = _options(q.shape[-1], scale, dropout_p, prefix_dropout_p, deterministic, max_seqlen)
    prefix_k, prefix_v = _bank(prefix_k, prefix_v, backend)
    if backend == "torch":
        from .cpu_backend import cpu_prefix_attention_varlen, use_cpu_kernel
        from .torch_backend import torch_prefix_attention_varlen

        attend = cpu_prefix_attention_varlen if use_cpu_kernel(requested, q.device) else torch_prefix_attention_varlen
        return attend(q, k, v, prefix_k, prefix_v, cu_seqlens, task_ids, options)
    if backend == "cuda":
        raise ValueError("packed sequences (prefix_attention_varlen) are not supported by backend='cuda' yet; use "
                         "backend='triton' or 'torch'")
    from .triton_backend import triton_prefix_attention

    return triton_prefix_attention(q, k, v, prefix_k, prefix_v, None, task_ids, None, options, cu_seqlens)
