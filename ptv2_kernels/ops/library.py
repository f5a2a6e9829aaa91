"""How a validated call reaches its backend: a plain ``torch.autograd.Function`` in eager mode, the op family
registered with ``torch.library`` while ``torch.compile`` traces (:func:`attend` picks).

Eager calls skip the registered op because its Python dispatch costs more host time than a small kernel:
``custom_op``'s dispatcher round trip (``backend_impl`` and dynamo's disable wrapper) in every forward, and in
every backward the autograd bridge of ``register_autograd`` with its ``fill_defaults`` and redispatches (about
60 µs forward and 300 µs forward+backward per call on the 2-core CI machine, against a C++ kernel of ~10-25 µs;
``ptv2-bench --mode overhead`` measures it). Both paths run the same backend functions (the table of
``dispatch.py``) and lay out their results alike, so compiled equals eager.

- ``ptv2::prefix_attention_fwd`` / ``ptv2::prefix_attention_bwd``: every backend (``triton``, ``cuda``, ``cpu``
  = the fused C++ kernel, ``torch-ref`` = the PyTorch composition) and every variant (padded, packed
  ``cu_seqlens``, attention bias, DeBERTa's c2p/p2c) through one schema; ``register_fake`` gives their output
  shapes, dtypes and strides (so dynamic shapes trace without running a kernel) and ``register_autograd``
  joins them. Inductor calls them as extern kernels: it neither re-traces a backend's internals nor plans
  their buffers.
- ``ptv2::dropout_seed``: the 63-bit dropout seed of one call, drawn from torch's default CPU generator
  (``torch.manual_seed`` governs it, eager or compiled). It travels to both passes as an int64 tensor
  argument, so a compiled graph draws exactly the seeds eager draws (:func:`draw_seed`) and never bakes one in;
  it is tagged ``nondeterministic_seeded`` so that graph passes never merge two draws.

Outputs have fixed layouts, the ones the fused kernels write: padded ``[B, H, N, D]`` stored as ``[B, N, H, D]``
(what transformers reshapes to hidden states without a copy), packed ``[total, H, D]`` contiguous; lse
``[B, H, N]`` (N = ``max_seqlen`` for packed rows) float32 (float64 for float64 inputs), empty where the
backend keeps none (``torch-ref`` off its merged CPU-flash path). Missing gradients are empty tensors.
"""

from dataclasses import replace
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .common import Dropout, Options


def _options(scale: float, dropout_p: float, prefix_dropout_p: float, seed: Tensor, deterministic: bool,
             max_seqlen: int) -> Options:
    active = dropout_p > 0.0 or prefix_dropout_p > 0.0
    return Options(scale, Dropout(dropout_p, prefix_dropout_p, int(seed) if active else 0), deterministic, max_seqlen)


def _new_qkv(like: Tensor, packed: bool) -> Tensor:
    """An uninitialised tensor shaped like ``like`` in the op's fixed q/k/v layout."""
    if packed:
        return like.new_empty(like.shape)
    batch, heads, seq, dim = like.shape
    return like.new_empty(batch, seq, heads, dim).transpose(1, 2)


def _qkv_layout(t: Tensor, packed: bool) -> Tensor:
    """A backend's q/k/v-shaped result in the op's fixed layout (a copy only if it came in another)."""
    if packed:
        _, heads, dim = t.shape
        expected = (heads * dim, dim, 1)
    else:
        _, heads, seq, dim = t.shape
        expected = (seq * heads * dim, dim, heads * dim, 1)
    return t if t.stride() == expected else _new_qkv(t, packed).copy_(t)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; ``t`` itself when it already is (``Tensor.to`` costs ~1 µs of host time even then, and
    a call casts up to seven results)."""
    return t if t.dtype == dtype else t.to(dtype)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _lse_shape(q: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int):
    if cu_seqlens is None:
        return q.shape[0], q.shape[1], q.shape[2]
    return cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen


def _relative(pos_key, pos_query, rel_index):
    return None if rel_index is None else (pos_key, pos_query, rel_index)


def _run_forward(backend: str, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index,
                 cu_seqlens, options: Options) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of one call in the op's layouts (lse empty where the backend keeps none)."""
    out, lse = dispatch.forward(backend)(q, k, v, prefix_k, prefix_v, mask, task_ids, bias,
                                         _relative(pos_key, pos_query, rel_index), cu_seqlens, options)
    lse = q.new_empty(0, dtype=_lse_dtype(q)) if lse is None else _cast(lse, _lse_dtype(q))
    return _qkv_layout(out, cu_seqlens is not None), lse


def _run_backward(backend: str, d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query,
                  rel_index, cu_seqlens, out, lse, options: Options, wants: tuple) -> list:
    """``[dq, dk, dv, dprefix_k, dprefix_v, dbias, dpos_key, dpos_query]`` of :func:`_run_forward`'s call: dq/dk/dv
    in the q/k/v layout, the prefix gradients ``[T, H, P, D]`` contiguous in the prefix dtype, the last three in
    their input's dtype where ``wants`` (three flags) asks for them, else None."""
    grads = dispatch.backward(backend)(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias,
                                       _relative(pos_key, pos_query, rel_index), cu_seqlens, out,
                                       lse if lse.numel() else None, options, wants[0], wants[1:])
    packed = cu_seqlens is not None
    result = [_qkv_layout(_cast(g, q.dtype), packed) for g in grads[:3]]
    result += [_cast(grads[3], prefix_k.dtype).contiguous(), _cast(grads[4], prefix_v.dtype).contiguous()]
    result += [_cast(g, like.dtype).contiguous() if wanted else None
               for g, like, wanted in zip(grads[5:], (bias, pos_key, pos_query), wants)]
    return result


# ----- eager mode ---------------------------------------------------------------------------------------------

class _EagerPrefixAttention(torch.autograd.Function):
    """The eager path: the backend's forward, and its backward through autograd's C++ engine, with no custom-op
    dispatch in between. The tensors that take no gradient (mask, task ids, relative index, cu_seqlens) travel
    as one tuple beside the options (fewer arguments for ``apply`` to inspect, fewer saved tensors)."""

    @staticmethod
    def forward(ctx, backend, options, fixed, q, k, v, prefix_k, prefix_v, bias, pos_key, pos_query):
        mask, task_ids, rel_index, cu_seqlens = fixed
        out, lse = _run_forward(backend, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query,
                                rel_index, cu_seqlens, options)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, bias, pos_key, pos_query, out, lse)
        ctx.backend, ctx.options, ctx.fixed = backend, options, fixed
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix_k, prefix_v, bias, pos_key, pos_query, out, lse = ctx.saved_tensors
        mask, task_ids, rel_index, cu_seqlens = ctx.fixed
        grads = _run_backward(ctx.backend, d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key,
                              pos_query, rel_index, cu_seqlens, out, lse, ctx.options, ctx.needs_input_grad[8:])
        return (None, None, None, *grads)


def draw_seed() -> Tensor:
    """A fresh 63-bit dropout seed (0-dim int64 CPU tensor) from torch's default CPU generator."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


# ----- the registered ops (torch.compile) ---------------------------------------------------------------------

@torch.library.custom_op("ptv2::dropout_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_seed(like: Tensor) -> Tensor:
    """:func:`draw_seed` as an op; ``like`` only orders the draw after the tensor it is drawn for (a layer's q),
    as eager code runs."""
    return draw_seed()


@dropout_seed.register_fake
def _(like):
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("ptv2::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, mask: Optional[Tensor],
                         task_ids: Optional[Tensor], bias: Optional[Tensor], pos_key: Optional[Tensor],
                         pos_query: Optional[Tensor], rel_index: Optional[Tensor], cu_seqlens: Optional[Tensor],
                         seed: Tensor, backend: str, scale: float, dropout_p: float, prefix_dropout_p: float,
                         deterministic: bool, max_seqlen: int) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of one validated call on ``backend`` (inputs as the backends' forwards take them)."""
    options = _options(scale, dropout_p, prefix_dropout_p, seed, deterministic, max_seqlen)
    return _run_forward(backend, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index,
                        cu_seqlens, options)


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index, cu_seqlens, seed, backend,
      scale, dropout_p, prefix_dropout_p, deterministic, max_seqlen):
    options = Options(scale, Dropout(dropout_p, prefix_dropout_p), deterministic, max_seqlen)
    shape = _lse_shape(q, cu_seqlens, max_seqlen) if dispatch.keeps_lse(backend, q, options) else (0,)
    return _new_qkv(q, cu_seqlens is not None), q.new_empty(shape, dtype=_lse_dtype(q))


@torch.library.custom_op("ptv2::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         mask: Optional[Tensor], task_ids: Optional[Tensor], bias: Optional[Tensor],
                         pos_key: Optional[Tensor], pos_query: Optional[Tensor], rel_index: Optional[Tensor],
                         cu_seqlens: Optional[Tensor], out: Tensor, lse: Tensor, seed: Tensor, backend: str,
                         scale: float, dropout_p: float, prefix_dropout_p: float, deterministic: bool,
                         max_seqlen: int, bias_grad: bool, pos_key_grad: bool,
                         pos_query_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dprefix_k, dprefix_v, dbias, dpos_key, dpos_query)`` of :func:`prefix_attention_fwd`'s call:
    dq/dk/dv in the q/k/v layout, the prefix gradients ``[T, H, P, D]`` summed per task in the prefix dtype,
    the others in their input's shape and dtype where their flag asks for them, else empty."""
    options = _options(scale, dropout_p, prefix_dropout_p, seed, deterministic, max_seqlen)
    grads = _run_backward(backend, d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query,
                          rel_index, cu_seqlens, out, lse, options, (bias_grad, pos_key_grad, pos_query_grad))
    return _unaliased([torch.empty(0) if g is None else g for g in grads])


def _unaliased(outputs) -> tuple:
    """``outputs`` with any that shares memory with an earlier one cloned (a custom op's outputs must not
    alias each other; the Triton backend returns the two prefix gradients as halves of one buffer)."""
    seen, result = set(), []
    for t in outputs:  # empty outputs all count as one place: two empty views of one buffer alias too (P = 0)
        pointer = t.untyped_storage().data_ptr() if t.numel() else None
        if pointer in seen:
            t = t.clone()
        seen.add(pointer)
        result.append(t)
    return tuple(result)


@prefix_attention_bwd.register_fake
def _(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index, cu_seqlens, out, lse,
      seed, backend, scale, dropout_p, prefix_dropout_p, deterministic, max_seqlen, bias_grad, pos_key_grad,
      pos_query_grad):
    packed = cu_seqlens is not None
    grads = [_new_qkv(q, packed) for _ in range(3)]
    grads += [torch.empty_like(prefix_k, memory_format=torch.contiguous_format),
              torch.empty_like(prefix_v, memory_format=torch.contiguous_format)]
    for wanted, like in ((bias_grad, bias), (pos_key_grad, pos_key), (pos_query_grad, pos_query)):
        grads.append(like.new_empty(like.shape) if wanted else torch.empty(0))
    return tuple(grads)


_SAVED = ("q", "k", "v", "prefix_k", "prefix_v", "mask", "task_ids", "bias", "pos_key", "pos_query", "rel_index",
          "cu_seqlens", "seed")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:len(_SAVED)], *output)
    ctx.arguments = inputs[len(_SAVED):]  # backend, scale, dropout_p, prefix_dropout_p, deterministic, max_seqlen
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, d_out, _d_lse):
    *inputs, seed, out, lse = ctx.saved_tensors
    wants = ctx.needs_input_grad
    dq, dk, dv, dpk, dpv, dbias, dpos_key, dpos_query = prefix_attention_bwd(
        d_out, *inputs, out, lse, seed, *ctx.arguments, wants[7], wants[8], wants[9])
    optional = [g if wanted else None for g, wanted in zip((dbias, dpos_key, dpos_query), wants[7:10])]
    return (dq, dk, dv, dpk, dpv, None, None, *optional, None, None, None) + (None,) * 6


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attend(backend: str, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index,
           cu_seqlens, options: Options) -> Tensor:
    """Run one validated call on ``backend`` (a key of :data:`~ptv2_kernels.ops.dispatch.BACKENDS`): the output,
    differentiable in q, k, v, the prefix, and (where given) bias and the relative embeddings.
    ``options.dropout.seed``: an int or a 0-dim int64 tensor (from :func:`dropout_seed`). Eager calls run the
    :class:`_EagerPrefixAttention` function (or, when nothing needs a gradient, the backend's forward alone),
    traced calls the registered op."""
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {tuple(dispatch.BACKENDS)}, got {backend!r}")
    if not torch.compiler.is_compiling():
        if isinstance(options.dropout.seed, Tensor):
            options = replace(options, dropout=replace(options.dropout, seed=int(options.dropout.seed)))
        differentiable = (q, k, v, prefix_k, prefix_v, bias, pos_key, pos_query)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
            return _EagerPrefixAttention.apply(backend, options, (mask, task_ids, rel_index, cu_seqlens),
                                               *differentiable)
        return _run_forward(backend, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query,
                            rel_index, cu_seqlens, options)[0]
    seed = options.dropout.seed
    if not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    dropout = options.dropout
    out, _ = prefix_attention_fwd(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, pos_key, pos_query, rel_index,
                                  cu_seqlens, seed, backend, float(options.scale), float(dropout.p),
                                  float(dropout.prefix_p), bool(options.deterministic), int(options.max_seqlen))
    return out
