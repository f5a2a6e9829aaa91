"""Host side of the CUDA backend: builds the hand-written kernels of ``ptv2_kernels/csrc/prefix_attention``
(one description for both builds, ``ptv2_kernels/build_spec.py``: ahead of time through ``setup.py`` with
``PTV2_BUILD_CUDA=1``, else with ninja on first use from the installed package's sources, cached in torch's
extension cache, ``TORCH_EXTENSIONS_DIR``) and runs them (:func:`cuda_forward`, :func:`cuda_backward`, which
``library.py`` calls through the table of ``dispatch.py``) with the semantics of the Triton backend. Importing
this module never builds anything and never fails on a machine without CUDA; :func:`cuda_status` says whether
the backend can run. The kernels take no attention bias, DeBERTa terms or packed rows yet: the public op
refuses those for this backend, so ``bias``, ``relative`` and ``cu_seqlens`` arrive as None (the signatures
are the other backends')."""

import functools
import importlib
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..build_spec import BuildError, cuda_spec
from .common import Dropout, Options

LOG2_E = 1.4426950408889634


def _nvcc() -> Optional[str]:
    """Path of the nvcc that torch would use (CUDA_HOME), or on PATH; None if there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[object], str]:
    """The compiled extension (the ahead-of-time build if installed, else a JIT build) and a reason
    string; ``(None, reason)`` when it cannot be had. Cached: one attempt per process."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        return None, f"backend='cuda' needs a CUDA GPU: {why} (torch {torch.__version__})"
    spec = cuda_spec()
    try:
        return importlib.import_module(spec.module), "ahead-of-time build (PTV2_BUILD_CUDA=1)"
    except ImportError:
        pass
    if _nvcc() is None:
        return None, ("backend='cuda' needs nvcc to build its kernels on first use: install the CUDA toolkit "
                      "(set CUDA_HOME) or install the package with PTV2_BUILD_CUDA=1")
    missing = spec.missing_sources()
    if missing:
        return None, f"backend='cuda': the kernel sources are missing from the installed package: {', '.join(missing)}"
    try:
        module = spec.jit_load()
    except BuildError as error:
        return None, f"backend='cuda': building the CUDA kernels failed; compiler output in {error.log}"
    return module, f"JIT build ({spec.jit_directory().name})"


def cuda_status() -> Tuple[bool, str]:
    """``(available, reason)``: whether ``backend="cuda"`` can run here, and why (or how it was built).
    Builds the extension on the first call on a GPU machine."""
    module, reason = _load()
    return module is not None, reason


def _extension():
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def _kernel_args(options: Options) -> dict:
    """Scale and dropout arguments of the kernels, computed exactly as the Triton backend does (same
    Python rounding of the threshold ``round(p * 2**24)``, same float keep scales)."""
    dropout: Dropout = options.dropout
    return dict(
        scale=options.scale,
        scale_log2=options.scale * LOG2_E,
        seed=dropout.seed,
        attn_dropout=dropout.p > 0,
        attn_threshold=round(dropout.p * (1 << 24)),
        attn_keep_scale=1.0 / (1.0 - dropout.p),
        prefix_dropout=dropout.prefix_p > 0,
        prefix_threshold=round(dropout.prefix_p * (1 << 24)),
        prefix_keep_scale=1.0 / (1.0 - dropout.prefix_p),
    )


def _mask_u8(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def cuda_forward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, options: Options):
    """``(out, lse)``: out ``[B, H, N, D]`` stored as ``[B, N, H, D]``, lse ``[B, H, N]`` float32. Inputs: q, k,
    v ``[B, H, N, D]`` (unit last stride); prefix_k, prefix_v contiguous ``[T, H, P, D]``; bool mask ``[B, N]``
    or None; task_ids ``[B]`` int64 or None."""
    extension = _extension()  # a RuntimeError saying why, before anything touches the device
    with torch.cuda.device(q.device):
        return extension.forward(q, k, v, prefix_k, prefix_v, _mask_u8(mask), task_ids, **_kernel_args(options))


def cuda_backward(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, out, lse,
                  options: Options, bias_grad: bool, relative_grads=(False, False)):
    """``(dq, dk, dv, dprefix_k, dprefix_v, None, None, None)``: the prefix gradients reduced over the batch in
    float32 (atomics, or a fixed order with ``options.deterministic``)."""
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    with torch.cuda.device(q.device):
        grads = _extension().backward(d_out, q, k, v, prefix_k, prefix_v, _mask_u8(mask), task_ids, out, lse,
                                      deterministic=options.deterministic, **_kernel_args(options))
    return (*grads, None, None, None)

