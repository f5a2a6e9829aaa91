"""Argument checks of the public attention ops, shared by :func:`~ptv2_kernels.prefix_attention`,
:func:`~ptv2_kernels.prefix_attention_varlen` and the concatenation baseline
:func:`~ptv2_kernels.concat_prefix_attention`, so that all three accept and refuse the same inputs.

Every check raises ``TypeError`` (wrong kind: not a tensor, wrong dtype) or ``ValueError`` (wrong shape,
layout, device or value) with a message that names the argument as the caller wrote it, the expected
form and what was received. The checks return the argument normalised for the backends (contiguous
masks and ids as int64, the prefix as a contiguous ``[T, H, P, D]`` bank).

Value checks (task ids in range, ``cu_seqlens`` rising, relative-position rows in range) read tensor
contents. On CPU tensors that costs nothing and they raise ``ValueError``. On any other device (CUDA) a
read would be a device→host synchronisation on every call, so the checks run *sync-free*: the condition
is computed on the device and asserted there with ``torch._assert_async`` (a failure surfaces as a
device-side assertion, a ``RuntimeError``, at the next synchronisation). Callers that want a
``ValueError`` on CUDA check once per forward on the host, e.g. with :func:`check_task_id_values`.
Every check takes ``sync_free`` (default: ``True`` off the CPU) so the device path is testable on CPU
tensors. Under ``torch.compile`` every value check is sync-free (a traced graph cannot read values).

Nothing is checked twice that the structure of a call decides: :func:`structure` is a key of the arguments'
shapes, strides, dtypes and devices (and the backend string), and a call whose key has passed before
(:data:`PASSED`) skips the structural checks (``known=True``) and keeps only the value checks and the
normalisation. Eager calls only: under ``torch.compile`` the checks are traced once into guards anyway.
"""

import math
from typing import NamedTuple, Optional

import torch

from .disentangled import DisentangledBias

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
KERNEL_HEAD_DIMS = range(16, 129)
TASK_ID_DTYPES = (torch.int64, torch.int32)


class Support(NamedTuple):
    """What one backend accepts: q's dtypes, head dims (None: any) and its name in messages."""

    dtypes: tuple
    head_dims: Optional[range]
    who: str


def _tensor(name: str, t, optional: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")


def _same_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must share one device")


def is_sync_free(t: torch.Tensor, sync_free: Optional[bool]) -> bool:
    """Whether value checks on ``t`` must avoid reading it back: always under ``torch.compile`` (a traced graph
    cannot read a value without breaking), else ``sync_free`` if given, else True for every device but the
    CPU (where a read costs nothing)."""
    if torch.compiler.is_compiling():
        return True
    return t.device.type != "cpu" if sync_free is None else sync_free


def require(ok: torch.Tensor, message: str, sync_free: bool) -> bool:
    """Whether the 0-dim bool tensor ``ok`` holds. Sync-free: asserted on its device
    (``torch._assert_async``, which raises ``RuntimeError(message)`` at once on the CPU and as a
    device-side assertion on CUDA) and reported as True without reading it; otherwise read on the host
    (the caller raises its ``ValueError`` with the values it received)."""
    if sync_free:
        torch._assert_async(ok, message)
        return True
    return bool(ok)


class _PassedStructures:
    """The :func:`structure` keys of calls whose structural checks passed (at most ``limit``, then forgotten
    all at once: a serving loop over many sequence lengths never grows it without bound)."""

    def __init__(self, limit: int = 1024):
        self.limit, self._keys = limit, set()

    def __contains__(self, key) -> bool:
        return key is not None and key in self._keys

    def add(self, key) -> None:
        if key is None:
            return
        if len(self._keys) >= self.limit:
            self._keys.clear()
        self._keys.add(key)

    def clear(self) -> None:
        self._keys.clear()


PASSED = _PassedStructures()


def structure(*args) -> Optional[tuple]:
    """The key of a call's structure: ``(shape, strides, dtype, device)`` of each tensor argument, a
    :class:`DisentangledBias` as its fields, None, strings and ints as they are. None (never remembered) while
    ``torch.compile`` traces or if an argument is anything else: such a call takes every check."""
    if torch.compiler.is_compiling():
        return None
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.shape, a.stride(), a.dtype, a.device))
        elif a is None or type(a) in (str, int):
            key.append(a)
        elif type(a) is DisentangledBias:
            fields = structure(a.pos_key, a.pos_query, a.index, a.rows)
            if fields is None:
                return None
            key.append(fields)
        else:
            return None
    return tuple(key)


def check_qkv(q, k, v, layout: str = "[B, H, N, D]") -> None:
    """q, k, v of one shape in ``layout`` (padded ``[B, H, N, D]`` or packed ``[total_tokens, H, D]``;
    H is dimension 1 and D the last in both), non-empty, unit last stride (any other strides)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t)
        if t.dim() != layout.count(",") + 1:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head_dim) dimension, got strides "
                             f"{tuple(t.stride())} (call .contiguous() on it)")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)} ({layout}), got {tuple(t.shape)}")
    if q.numel() == 0:
        raise ValueError(f"q must have non-empty dimensions {layout}, got shape {tuple(q.shape)}")


def check_prefix(q, prefix_k, prefix_v) -> None:
    """One prefix ``[H, P, D]`` or a bank ``[T, H, P, D]`` (T >= 1, P >= 0) matching q's H and D; any strides."""
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _tensor(name, t)
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be [H, P, D] or a bank [T, H, P, D], got shape {tuple(t.shape)}")
    heads, dim = q.shape[1], q.shape[-1]
    if prefix_k.shape[-3] != heads or prefix_k.shape[-1] != dim:
        raise ValueError(f"prefix_k must be [H={heads}, P, D={dim}] (or [T, {heads}, P, {dim}]) to match q, "
                         f"got shape {tuple(prefix_k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have the shape of prefix_k {tuple(prefix_k.shape)}, got "
                         f"{tuple(prefix_v.shape)}")
    if prefix_k.dim() == 4 and prefix_k.shape[0] == 0:
        raise ValueError("prefix_k is a bank with zero tasks ([T, H, P, D] with T = 0)")


def check_dtypes_and_devices(q, tensors: dict, support: Support) -> None:
    """Every tensor of ``tensors`` (name -> tensor) on q's device with q's dtype; q's dtype and head_dim
    among those the backend ``support`` describes."""
    for name, t in tensors.items():
        _same_device(name, t, q)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v, prefix_k and prefix_v "
                            "must share one dtype (cast the prefix to the activations' dtype)")
    if q.dtype not in support.dtypes:
        raise TypeError(f"q has dtype {q.dtype}; {support.who} supports {', '.join(map(str, support.dtypes))}")
    dims = support.head_dims
    if dims is not None and q.shape[-1] not in dims:
        raise ValueError(f"head_dim (last dim of q) must be in {dims.start}..{dims.stop - 1} for {support.who}, "
                         f"got {q.shape[-1]}")


def prefix_bank(prefix_k: torch.Tensor, prefix_v: torch.Tensor):
    """The prefix as the contiguous ``[T, H, P, D]`` bank every backend receives (T = 1 for a single
    prefix). A copy only if it was not contiguous (the prefix is small): PyTorch's CPU flash-attention
    kernel, which the torch backend calls directly, silently assumes a unit last stride, and the fused
    kernels index the bank with its contiguous strides."""
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    return prefix_k.contiguous(), prefix_v.contiguous()


def check_mask(q, mask, known: bool = False) -> Optional[torch.Tensor]:
    """``key_padding_mask`` ``[B, N]`` bool (True = real token) on q's device, returned contiguous (``known``:
    its structure passed before, only the normalisation runs)."""
    if mask is None or known:
        return None if mask is None else mask.contiguous()
    _tensor("key_padding_mask", mask, optional=True)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got dtype {mask.dtype}: "
                        "convert a 0/1 padding mask with .bool(); additive float masks are not accepted (use "
                        "attn_bias for a bias)")
    if mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"key_padding_mask must be [B, N] = {(q.shape[0], q.shape[2])}, got {tuple(mask.shape)}")
    _same_device("key_padding_mask", mask, q)
    return mask.contiguous()


def check_task_ids(q, batch: int, prefix_k, task_ids, sync_free: Optional[bool] = None,
                   known: bool = False) -> Optional[torch.Tensor]:
    """``task_ids`` ``[B]`` int64/int32 on q's device, required with (and only with) a bank ``prefix_k``
    ``[T, H, P, D]``, values in ``[0, T)``; returned contiguous int64. Sync-free off the CPU (see the
    module docstring). ``known``: the structure passed before; only the values are checked."""
    if known:
        if task_ids is not None:
            check_task_id_values(task_ids, prefix_k.shape[0], sync_free)
            task_ids = task_ids.to(torch.int64).contiguous()
        return task_ids
    is_bank = prefix_k.dim() == 4
    if task_ids is None:
        if is_bank:
            raise ValueError(f"task_ids ([B] int64) is required with a prefix bank [T, H, P, D], got prefix_k "
                             f"{tuple(prefix_k.shape)} and task_ids=None")
        return None
    if not is_bank:
        raise ValueError(f"task_ids was given but prefix_k is a single prefix [H, P, D] {tuple(prefix_k.shape)}; "
                         "pass a bank [T, H, P, D] or task_ids=None")
    _tensor("task_ids", task_ids, optional=True)
    if task_ids.dtype not in TASK_ID_DTYPES:
        raise TypeError(f"task_ids must be an int64 (or int32) tensor, got dtype {task_ids.dtype}")
    if task_ids.shape != (batch,):
        raise ValueError(f"task_ids must be [B] = [{batch}], got shape {tuple(task_ids.shape)}")
    _same_device("task_ids", task_ids, q)
    check_task_id_values(task_ids, prefix_k.shape[0], sync_free)
    return task_ids.to(torch.int64).contiguous()


def check_task_id_values(task_ids: torch.Tensor, num_tasks: int, sync_free: Optional[bool] = None) -> None:
    """Every id in ``[0, num_tasks)``: a ``ValueError`` on the host, or (sync-free) a device assertion.
    Pass ``sync_free=False`` to check a CUDA tensor on the host (one synchronisation, e.g. once per model
    forward instead of once per layer)."""
    in_range = ((task_ids >= 0) & (task_ids < num_tasks)).all()
    expected = f"task_ids must lie in [0, {num_tasks}) for a bank of {num_tasks} tasks"
    if not require(in_range, expected, is_sync_free(task_ids, sync_free)):
        raise ValueError(f"{expected}, got values in [{int(task_ids.min())}, {int(task_ids.max())}]")


def check_bias(q, bias, known: bool = False) -> Optional[torch.Tensor]:
    """``attn_bias`` ``[B, H, N, N]`` (or broadcastable to it), floating, on q's device; returned expanded
    (a view, any strides). ``known``: the structure passed before; only the expansion runs."""
    if bias is None:
        return None
    if known:
        return bias.expand(q.shape[0], q.shape[1], q.shape[2], q.shape[2])
    _tensor("attn_bias", bias, optional=True)
    if not bias.is_floating_point():
        raise TypeError(f"attn_bias must be a floating-point tensor, got dtype {bias.dtype}")
    _same_device("attn_bias", bias, q)
    batch, heads, seq, _ = q.shape
    try:
        return bias.expand(batch, heads, seq, seq)
    except RuntimeError:
        raise ValueError(f"attn_bias must be [B, H, N, N] = {(batch, heads, seq, seq)} or broadcastable to it, "
                         f"got {tuple(bias.shape)}") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_probability(name: str, p) -> float:
    """A dropout rate in ``[0, 1)``."""
    if not _is_number(p):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def check_scale(scale, head_dim: int) -> float:
    """The score scale: finite and positive, default ``1/sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(int(head_dim))
    if not _is_number(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not 0.0 < scale < math.inf:  # also False for NaN; comparisons trace, math.isfinite does not
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _abridged(values: list) -> list:
    return values if len(values) <= 8 else values[:4] + ["..."] + values[-2:]


def check_cu_seqlens(q, cu_seqlens, max_seqlen, sync_free: Optional[bool] = None):
    """``cu_seqlens`` ``[B + 1]`` int32/int64 rising from 0 to total_tokens without decreasing, and
    ``max_seqlen`` (an int >= the longest row, or None); returns ``(cu_seqlens as contiguous int64,
    max_seqlen)``. With ``max_seqlen=None`` the longest row must be read back: one synchronisation off
    the CPU, in which the other checks ride along (host errors). With ``max_seqlen`` given, the checks
    are sync-free off the CPU (see the module docstring)."""
    _tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    _same_device("cu_seqlens", cu_seqlens, q)
    if max_seqlen is not None:
        if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
            raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        if max_seqlen < 1:
            raise ValueError(f"max_seqlen must be an int >= the longest row (>= 1), got {max_seqlen}")
    total = q.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    rising = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lengths >= 0).all()
    # traced code: formatting a symbolic size would specialise the graph to it
    total_shown = "" if torch.compiler.is_compiling() else f" = {total}"
    expected = f"cu_seqlens must rise from 0 to total_tokens{total_shown} without decreasing"
    if max_seqlen is not None and is_sync_free(cu_seqlens, sync_free):
        require(rising & (lengths <= max_seqlen).all(),
                f"{expected}, and max_seqlen={max_seqlen} must be >= the longest row", True)
    else:  # the host check, or (max_seqlen=None) the one unavoidable read of the longest row
        is_rising, longest = torch.stack([rising.long(), lengths.max().long()]).tolist()
        if not is_rising:
            raise ValueError(f"{expected}, got {_abridged(cu_seqlens.tolist())}")
        if max_seqlen is None:
            max_seqlen = longest
        elif max_seqlen < longest:
            raise ValueError(f"max_seqlen must be an int >= the longest row ({longest}), got {max_seqlen}")
    return cu_seqlens.to(torch.int64).contiguous(), max_seqlen


def check_disentangled(q, bias, sync_free: Optional[bool] = None, known: bool = False) -> Optional[DisentangledBias]:
    """``disentangled_bias`` against q ``[B, H, N, D]``; returns it with contiguous embeddings (small) or
    None. The index is checked against ``R`` through ``bias.rows`` when known, else by its values
    (sync-free off the CPU, see the module docstring). ``known``: the structure passed before; only the index
    values are checked."""
    if bias is None:
        return None
    if known:
        if bias.rows is None:
            _check_index_values(bias.index, (bias.pos_key if bias.pos_key is not None else bias.pos_query).shape[1],
                                sync_free)
        return _contiguous(bias)
    if not isinstance(bias, DisentangledBias):
        raise TypeError(f"disentangled_bias must be a DisentangledBias or None, got {type(bias).__name__}")
    _, heads, seq, dim = q.shape
    index = bias.index
    def expected():  # formatted only to raise (a symbolic N would be specialised by formatting)
        return f"disentangled_bias.index must be an int32 tensor [2, 2N - 1] = [2, {2 * seq - 1}]"

    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{expected()}, got {type(index).__name__}")
    if index.dtype != torch.int32:
        raise TypeError(f"{expected()}, got dtype {index.dtype}")
    if index.shape != (2, 2 * seq - 1):
        raise ValueError(f"{expected()}, got shape {tuple(index.shape)}")
    _same_device("disentangled_bias.index", index, q)
    if bias.pos_key is None and bias.pos_query is None:
        raise ValueError("disentangled_bias needs pos_key (c2p), pos_query (p2c) or both, got neither")
    rows = []
    for name in ("pos_key", "pos_query"):
        emb = getattr(bias, name)
        if emb is None:
            continue
        _tensor(f"disentangled_bias.{name}", emb, optional=True)
        if emb.dim() != 3 or emb.shape[0] != heads or emb.shape[2] != dim or emb.shape[1] == 0:
            raise ValueError(f"disentangled_bias.{name} must be [H={heads}, R, D={dim}] with R >= 1, got "
                             f"{tuple(emb.shape)}")
        if emb.device != q.device or emb.dtype != q.dtype:
            error = TypeError if emb.device == q.device else ValueError
            raise error(f"disentangled_bias.{name} must match q's device and dtype ({q.device}, {q.dtype}), "
                        f"got {emb.device}, {emb.dtype}")
        rows.append(emb.shape[1])
    if len(set(rows)) > 1:
        raise ValueError(f"disentangled_bias.pos_key and pos_query must have the same number of rows R, got {rows}")
    if bias.rows is not None:
        if not isinstance(bias.rows, int) or isinstance(bias.rows, bool):
            raise TypeError(f"disentangled_bias.rows must be an int or None, got {type(bias.rows).__name__}")
        if rows[0] < bias.rows:
            raise ValueError(f"disentangled_bias embeddings have R={rows[0]} rows but its index reaches row "
                             f"{bias.rows - 1} (2·span rows are needed)")
    else:
        _check_index_values(index, rows[0], sync_free)
    return _contiguous(bias)


def _check_index_values(index: torch.Tensor, rows: int, sync_free: Optional[bool]) -> None:
    in_range = ((index >= 0) & (index < rows)).all()
    expected = f"disentangled_bias.index must lie in [0, R={rows})"
    if not require(in_range, expected, is_sync_free(index, sync_free)):
        raise ValueError(f"{expected}, got values in [{int(index.min())}, {int(index.max())}]")


def _contiguous(bias: DisentangledBias) -> DisentangledBias:
    return DisentangledBias(*(None if t is None else t.contiguous() for t in (bias.pos_key, bias.pos_query)),
                            bias.index.contiguous(), bias.rows)


class PaddedCall(NamedTuple):
    """The checked, normalised arguments of a padded call (after q, k, v): the prefix as a contiguous
    ``[T, H, P, D]`` bank, the mask, task ids, bias and relative terms (or None) and the scalars."""

    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    mask: Optional[torch.Tensor]
    task_ids: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    disentangled: Optional[DisentangledBias]
    scale: float
    dropout_p: float
    prefix_dropout_p: float


def check_padded_call(q, k, v, prefix_k, prefix_v, *, key_padding_mask, task_ids, attn_bias, disentangled_bias,
                      scale, dropout_p, prefix_dropout_p, support: Support, known: bool = False) -> PaddedCall:
    """Every argument of a padded ``prefix_attention``-style call but q, k, v themselves (checked first
    with :func:`check_qkv`, so that the backend can be chosen from q's device). ``known``: the call's
    :func:`structure` passed before (:data:`PASSED`): only the value checks and the normalisation run."""
    if not known:
        check_prefix(q, prefix_k, prefix_v)
        check_dtypes_and_devices(q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}, support)
    mask = check_mask(q, key_padding_mask, known)
    task_ids = check_task_ids(q, q.shape[0], prefix_k, task_ids, known=known)
    bias = check_bias(q, attn_bias, known)
    disentangled = check_disentangled(q, disentangled_bias, known=known)
    dropout_p = check_probability("dropout_p", dropout_p)
    prefix_dropout_p = check_probability("prefix_dropout_p", prefix_dropout_p)
    scale = check_scale(scale, q.shape[-1])
    return PaddedCall(*prefix_bank(prefix_k, prefix_v), mask, task_ids, bias, disentangled, scale, dropout_p,
                      prefix_dropout_p)
