"""``prefix_attention`` (SPEC §3) and its packed variable-length twin ``prefix_attention_varlen``: the
public ops. Choose the backend, validate every argument (:mod:`.validation`, shared with the
concatenation baseline), which also normalises the prefix to a contiguous ``[T, H, P, D]`` bank, draw
the dropout seed and dispatch to a backend."""

from typing import Optional

import torch

from .common import Dropout, Options
from .cpu_backend import use_cpu_kernel
from .disentangled import DisentangledBias, bias_matrix
from .library import attend, draw_seed, dropout_seed
from .torch_ref_backend import pad_packed
from .validation import (KERNEL_DTYPES, KERNEL_HEAD_DIMS, PASSED, TORCH_DTYPES, PaddedCall, Support,
                         check_cu_seqlens, check_disentangled, check_dtypes_and_devices, check_flag, check_padded_call,
                         check_prefix, check_probability, check_qkv, check_scale, check_task_ids, prefix_bank,
                         structure)

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch-ref")
OLD_NAMES = ("torch",)  # still accepted: cpu on CPU tensors, torch-ref on others


def check_backend(backend) -> str:
    """``backend`` if it is one of :data:`BACKENDS` or :data:`OLD_NAMES`, else a ``ValueError`` naming them."""
    if backend not in BACKENDS and backend not in OLD_NAMES:
        raise ValueError(f"backend must be one of {BACKENDS} (or the old name 'torch'), got {backend!r}")
    return backend


def backend_support(backend: str) -> Support:
    """The dtypes and head dims a resolved ``backend`` accepts (checked by :mod:`.validation`)."""
    if backend in ("cpu", "torch-ref"):
        return Support(TORCH_DTYPES, None, f"backend={backend!r}")
    return Support(KERNEL_DTYPES, KERNEL_HEAD_DIMS, f"backend={backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs, a key of :data:`~ptv2_kernels.ops.dispatch.BACKENDS`: ``auto`` is triton on a GPU
    and cpu on the CPU; ``torch`` (the old name) is cpu on CPU tensors and torch-ref elsewhere; cpu becomes
    torch-ref (with a warning, once) where the fused C++ kernel cannot be built
    (:func:`~ptv2_kernels.ops.cpu_backend.use_cpu_kernel`)."""
    if check_backend(backend) == "auto":  # triton until the CUDA kernels have been validated on a GPU
        backend = "triton" if device.type == "cuda" else "cpu"
    elif backend == "torch":
        backend = "cpu" if device.type == "cpu" else "torch-ref"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got q on {device}")
        return backend if use_cpu_kernel(backend, device) else "torch-ref"
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


def _seed(q: torch.Tensor, dropout_p: float, prefix_dropout_p: float):
    """A fresh 63-bit seed from torch's default CPU generator (so ``torch.manual_seed`` governs it): an int in
    eager mode, the 0-dim int64 tensor of the registered ``ptv2::dropout_seed`` while compiling (the same draw);
    0 without dropout."""
    if dropout_p == 0.0 and prefix_dropout_p == 0.0:
        return 0
    if torch.compiler.is_compiling():
        return dropout_seed(q)
    return int(draw_seed())


def _options(q, scale, dropout_p, prefix_dropout_p, deterministic, max_seqlen=0) -> Options:
    """The call's :class:`Options` from checked scalars (a seed is drawn only with dropout)."""
    return Options(
        scale=scale,
        dropout=Dropout(dropout_p, prefix_dropout_p, _seed(q, dropout_p, prefix_dropout_p)),
        deterministic=check_flag("deterministic", deterministic) or torch.are_deterministic_algorithms_enabled(),
        max_seqlen=max_seqlen,
    )


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
            projections are read in place, broadcast views too), unit last stride (else ``ValueError``).
        prefix_k, prefix_v: one layer's compact prefix ``[H, P, D]`` shared by every row, or a bank
            ``[T, H, P, D]`` indexed per row by ``task_ids``. P may be 0. Any strides (copied to a
            contiguous buffer if needed: the prefix is small).
        key_padding_mask: ``[B, N]`` bool, True = real token (a float or integer mask is a ``TypeError``,
            never read as an additive bias). Prefix columns are always visible. A row with no visible
            column at all (P = 0, fully padded) outputs zeros.
        task_ids: ``[B]`` int64/int32 task of each row, in ``[0, T)``; required with (and only with) a
            bank. On CPU tensors an id out of range is a ``ValueError``; on CUDA tensors the range is
            asserted on the device (no device→host synchronisation per call), so a bad id surfaces as a
            device-side assertion (``RuntimeError``) at the next synchronisation. Models check their
            ``task_ids`` once per forward on the host.
        scale: score scale, default ``1/sqrt(D)``.
        dropout_p: attention-probability dropout, prefix columns included (pass 0 in eval).
        prefix_dropout_p: P-Tuning v2 prefix dropout: an independent mask per batch row over the prefix
            K/V elements, drawn in-kernel (no ``[B, H, P, D]`` tensor on the fused backends).
        backend: ``"auto"`` (triton on a GPU, cpu on the CPU), ``"triton"`` (on CPU tensors under the
            Triton interpreter), ``"cuda"``, ``"cpu"`` (the fused C++ kernel; where it cannot be built, a
            warning and the composition) or ``"torch-ref"`` (the pure-PyTorch composition, no
            concatenation). The old name ``"torch"`` is still accepted: cpu on CPU tensors, torch-ref on
            others. Each name is a key of :data:`~ptv2_kernels.ops.dispatch.BACKENDS`, which names its module.
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

    Raises:
        ``TypeError`` (not a tensor, wrong dtype) or ``ValueError`` (shape, layout, device, value) naming
        the argument, what was expected and what was received.

    Non-finite inputs are not checked (that would read every tensor back). As with PyTorch's
    ``scaled_dot_product_attention``, a NaN or Inf in a row's real keys, in its values (padded ones too:
    their zero weight times NaN is NaN) or in the prefix its task uses can make that row's output and
    gradients non-finite; whether a NaN/Inf in a padded key does depends on the backend (SDPA and the
    torch backend's CPU flash path add the padding to it as -inf, Triton masks those scores). It never
    reaches another batch row, the rows of another bank task, or another task's prefix gradient (a
    shared prefix's gradient sums every row's).
    """
    backend, call, deterministic = _check_padded(
        q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, task_ids=task_ids, scale=scale,
        dropout_p=dropout_p, prefix_dropout_p=prefix_dropout_p, backend=backend, deterministic=deterministic,
        attn_bias=attn_bias, disentangled_bias=disentangled_bias)
    return _attend_padded(backend, q, k, v, call, deterministic)


def _check_padded(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, task_ids=None, scale=None, dropout_p=0.0,
                  prefix_dropout_p=0.0, backend="auto", deterministic=False, attn_bias=None, disentangled_bias=None):
    """Every check of a :func:`prefix_attention` call (those its :func:`~.validation.structure` passed before
    only as far as values go): ``(resolved backend, checked PaddedCall, deterministic)``."""
    key = structure(backend, q, k, v, prefix_k, prefix_v, key_padding_mask, task_ids, attn_bias, disentangled_bias)
    known = key in PASSED  # this structure passed every structural check before: values and normalisation only
    if not known:
        check_qkv(q, k, v)
    backend = resolve_backend(backend, q.device)
    call = check_padded_call(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, task_ids=task_ids,
                             attn_bias=attn_bias, disentangled_bias=disentangled_bias, scale=scale,
                             dropout_p=dropout_p, prefix_dropout_p=prefix_dropout_p, support=backend_support(backend),
                             known=known)
    deterministic = check_flag("deterministic", deterministic)
    if not known:
        PASSED.add(key)
    return backend, call, deterministic


def _attend_padded(backend: str, q, k, v, call: PaddedCall, deterministic: bool) -> torch.Tensor:
    """Run a checked padded call: draw its dropout seed, materialise DeBERTa's terms where the backend needs
    them, and attend."""
    prefix_k, prefix_v, mask, task_ids = call.prefix_k, call.prefix_v, call.mask, call.task_ids
    bias, disentangled = call.bias, call.disentangled
    options = _options(q, call.scale, call.dropout_p, call.prefix_dropout_p, deterministic)
    if backend == "cuda" and (bias is not None or disentangled is not None):
        raise ValueError("attn_bias and disentangled_bias are not supported by backend='cuda' yet; use "
                         "backend='triton' or 'cpu'")
    if backend == "cpu" and bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if disentangled is not None and (backend == "torch-ref" or (backend == "triton" and options.deterministic)):
        # the per-distance atomics of Triton's fused gradient are not reproducible: deterministic runs materialise
        # (the CPU kernel gathers the terms itself and reduces in a fixed order)
        relative = bias_matrix(q, k, disentangled, options.scale)
        bias, disentangled = relative if bias is None else bias + relative, None
    rel = (None, None, None) if disentangled is None else disentangled.tensors
    return attend(backend, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, *rel, None, options)


def prefix_attention_checked_once(state: dict, q, k, v, prefix_k, prefix_v, **kwargs) -> torch.Tensor:
    """:func:`prefix_attention` for the layers of one model forward, ``state`` a dict the forward keeps (a
    patched model's :class:`~ptv2_kernels.patching.base.PrefixCall`), so that the model checks once per forward
    instead of once per layer: the first call takes every check; a later call whose q, k, v and prefix have the
    first one's :func:`~.validation.structure` and whose other arguments are the same tensors and equal values
    skips them all and reuses the first call's checked mask, task ids and scalars (with its own prefix and a
    fresh dropout seed). Calls with a bias or DeBERTa's terms (new tensors in every layer), and traced calls
    (checked once at trace time anyway), take the op itself."""
    if (torch.compiler.is_compiling() or kwargs.get("attn_bias") is not None
            or kwargs.get("disentangled_bias") is not None):
        return prefix_attention(q, k, v, prefix_k, prefix_v, **kwargs)
    key = structure(q, k, v, prefix_k, prefix_v)
    first = state.get("first")
    if first is None or key is None or key != first[0] or not _same_arguments(kwargs, first[1]):
        backend, call, deterministic = _check_padded(q, k, v, prefix_k, prefix_v, **kwargs)
        state["first"] = key, kwargs, (backend, call, deterministic)
    else:
        backend, call, deterministic = first[2]
        bank_k, bank_v = prefix_bank(prefix_k, prefix_v)
        call = call._replace(prefix_k=bank_k, prefix_v=bank_v)
    return _attend_padded(backend, q, k, v, call, deterministic)


def _same_arguments(a: dict, b: dict) -> bool:
    """The same keywords with the same tensors (identity) and equal values of the same types."""
    return a.keys() == b.keys() and all(
        x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y) for x, y in
        ((a[name], b[name]) for name in a))


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
    disentangled_bias: Optional[DisentangledBias] = None,
) -> torch.Tensor:
    """:func:`prefix_attention` on sequences packed without padding (FlashAttention's varlen layout).

    Args:
        q, k, v: packed ``[total_tokens, H, D]`` (strided views accepted, unit last stride); row ``b`` is
            tokens ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` and attends only to its own tokens and its
            prefix.
        cu_seqlens: ``[B + 1]`` int32/int64 cumulative lengths, from 0 to total_tokens.
        max_seqlen: an upper bound of the longest row. If None it is read from ``cu_seqlens``: on CUDA
            tensors one device→host synchronisation per call (with the checks of ``cu_seqlens``). Pass it
            to avoid that: the checks then run on the device (a bad ``cu_seqlens`` or a row longer than
            ``max_seqlen`` is a device-side assertion, as for ``task_ids``).
        disentangled_bias: DeBERTa's c2p/p2c as for :func:`prefix_attention`, its index built for
            N = ``max_seqlen``; the terms use query/column positions within each row. The Triton backend
            gathers them per tile; the torch backend materialises them on its padded rows. With
            ``deterministic`` reductions the Triton backend cannot give the relative embeddings a gradient
            (their per-distance reduction uses atomics): it raises then.
        Other arguments as :func:`prefix_attention` (no padding mask: there is no padding; no attn_bias).
        Dropout masks use the same counters as the padded op (query/column positions within the row).

    Returns:
        ``[total_tokens, H, D]``, differentiable in q, k, v, prefix_k and prefix_v. The Triton backend and
        the fused CPU kernel (``backend="cpu"``) read the packed tokens in place; ``torch-ref`` pads, attends
        and unpacks.
    """
    check_qkv(q, k, v, layout="[total_tokens, H, D]")
    check_prefix(q, prefix_k, prefix_v)
    backend = resolve_backend(backend, q.device)
    check_dtypes_and_devices(q, {"k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v},
                             backend_support(backend))
    cu_seqlens, max_seqlen = check_cu_seqlens(q, cu_seqlens, max_seqlen)
    task_ids = check_task_ids(q, cu_seqlens.shape[0] - 1, prefix_k, task_ids)
    # checked as for padded rows of max_seqlen tokens (a zero-stride stand-in of q: shape, dtype, device)
    padded_q = q.new_empty(()).expand(1, q.shape[1], max_seqlen, q.shape[2])
    disentangled = check_disentangled(padded_q, disentangled_bias)
    options = _options(q, check_scale(scale, q.shape[-1]), check_probability("dropout_p", dropout_p),
                       check_probability("prefix_dropout_p", prefix_dropout_p), deterministic, max_seqlen)
    prefix_k, prefix_v = prefix_bank(prefix_k, prefix_v)
    if backend == "cpu" and disentangled is not None:  # packed DeBERTa rows: the composition on padded rows
        backend = "torch-ref"
    if backend == "torch-ref":
        (q, k, v), mask, real_tokens = pad_packed(cu_seqlens, max_seqlen, q, k, v)
        bias = None if disentangled is None else bias_matrix(q, k, disentangled, options.scale)
        out = attend(backend, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, None, None, None, None, options)
        return out.transpose(1, 2)[real_tokens]
    if backend == "cuda":
        raise ValueError("packed sequences (prefix_attention_varlen) are not supported by backend='cuda' yet; use "
                         "backend='triton' or 'cpu'")
    if (disentangled is not None and options.deterministic and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (disentangled.pos_key, disentangled.pos_query))):
        raise ValueError("prefix_attention_varlen with disentangled_bias and deterministic reductions cannot "
                         "differentiate the relative embeddings on backend='triton' (atomics); use backend='cpu' "
                         "or the padded prefix_attention")
    rel = (None, None, None) if disentangled is None else disentangled.tensors
    return attend(backend, q, k, v, prefix_k, prefix_v, None, task_ids, None, *rel, cu_seqlens, options)
