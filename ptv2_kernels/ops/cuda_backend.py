"""Host side of the CUDA backend: builds the hand-written kernels of ``csrc/prefix_attention`` (ahead of
time through ``setup.py`` with ``PTV2_BUILD_CUDA=1``, else with ninja on first use, cached by torch under
``TORCH_EXTENSIONS_DIR``) and runs them (:func:`cuda_forward`, :func:`cuda_backward`, which ``library.py``
calls through the table of ``dispatch.py``) with the semantics of the Triton backend. Importing this module
never builds anything and never fails on a machine without CUDA; :func:`cuda_status` says whether the backend can run. The
kernels take no attention bias, DeBERTa terms or packed rows yet: the public op refuses those for this backend,
so ``bias``, ``relative`` and ``cu_seqlens`` arrive as None (the signatures are the other backends')."""

import functools
import importlib
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch

from .common import Dropout, Options

LOG2_E = 1.4426950408889634
EXTENSION_NAME = "ptv2_prefix_attention_cuda"
CSRC = Path(__file__).resolve().parents[2] / "csrc" / "prefix_attention"
SOURCES = ("binding.cpp", "forward.cu", "backward.cu")
NVCC_FLAGS = ("-O3", "-lineinfo")


def _nvcc() -> Optional[str]:
    """Path of the nvcc that torch would use (CUDA_HOME), or on PATH; None if there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build_log_path() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", get_default_build_root()))
    return root / f"{EXTENSION_NAME}.build.log"


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[object], str]:
    """The compiled extension (the ahead-of-time build if installed, else a JIT build) and a reason
    string; ``(None, reason)`` when it cannot be had. Cached: one attempt per process."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        return None, f"backend='cuda' needs a CUDA GPU: {why} (torch {torch.__version__})"
    try:
        return importlib.import_module("ptv2_kernels._cuda_ext"), "ahead-of-time build (PTV2_BUILD_CUDA=1)"
    except ImportError:
        pass
    if _nvcc() is None:
        return None, ("backend='cuda' needs nvcc to build its kernels on first use: install the CUDA toolkit "
                      "(set CUDA_HOME) or install the package with PTV2_BUILD_CUDA=1")
    if not all((CSRC / name).exists() for name in SOURCES):
        return None, f"backend='cuda': the kernel sources are missing from {CSRC}"
    from torch.utils.cpp_extension import load

    log_path = _build_log_path()
    try:
        module = load(name=EXTENSION_NAME, sources=[str(CSRC / name) for name in SOURCES],
                      extra_cuda_cflags=list(NVCC_FLAGS), extra_include_paths=[str(CSRC)], verbose=False)
    except Exception as error:  # a failed compile or link: keep the compiler output for the user
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"{type(error).__name__}: {error}\n")
        return None, f"backend='cuda': building the CUDA kernels failed; compiler output in {log_path}"
    return module, f"JIT build ({EXTENSION_NAME})"


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

