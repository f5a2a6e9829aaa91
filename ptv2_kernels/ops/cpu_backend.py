"""Host side of the fused CPU kernels (``csrc/cpu``): what ``backend="cpu"`` runs (the default on CPU tensors;
``"torch"`` is its old name).

The kernels (C++, ATen ``at::vec``, ``at::parallel_for``) do one online-softmax pass per query block over
the prefix read from the compact ``[T, H, P, D]`` bank and then the sequence, skipping keys past a row's
last real token, and save the row log-sum-exp; the backward recomputes the probabilities per block and
reduces the prefix gradients over the batch in a fixed order (deterministic, whatever the number of
threads). Dropout follows RNG contract v2 (``ops/philox.py``), so a seed gives the masks of every other
backend. Inputs are read in place (strided q/k/v views, a strided bank); half precision accumulates in
float32, float64 in float64.

Build (one description for both builds: ``ptv2_kernels/build_spec.py``): ahead of time into the package
(``PTV2_BUILD_CPU=1``, portable flags, see ``setup.py``), else on first use with ninja from the package's own
sources (``ptv2_kernels/csrc/cpu``), cached in torch's extension cache (``TORCH_EXTENSIONS_DIR``). The first-use
build compiles for the machine it runs on: ``-O3 -march=native``, the ``CPU_CAPABILITY_*`` macro of the
instruction set torch uses here (``torch.backends.cpu.get_cpu_capability()``), which selects ATen's vectorised
``at::vec`` implementation (AVX512 or AVX2; scalar otherwise), and ``-fopenmp`` (``at::parallel_for`` is inline
OpenMP code). Importing this module builds nothing and never fails; without a compiler or ninja (or with
``PTV2_DISABLE_CPU_KERNEL=1``) :func:`use_cpu_kernel` says no, warning once, and ``backend="cpu"`` runs the
pure-PyTorch composition (``backend="torch-ref"``) instead.

``cpu_forward`` / ``cpu_backward`` are plain functions of tensors; ``library.py`` calls them through the table
of ``dispatch.py``.
"""

import functools
import importlib
import os
import shutil
import sys
import warnings
from typing import Optional, Tuple

import torch

from ..build_spec import CPU_CAPABILITIES, BuildError, cpu_spec
from .common import Options

DISABLE_ENV = "PTV2_DISABLE_CPU_KERNEL"


def _capability() -> str:
    """The vector instruction set torch's own CPU kernels use here (honours ``ATEN_CPU_CAPABILITY``)."""
    name = torch.backends.cpu.get_cpu_capability()
    return name if name in CPU_CAPABILITIES else "DEFAULT"


def _ahead_of_time() -> Tuple[Optional[object], str]:
    """The extension built by ``PTV2_BUILD_CPU=1`` for this torch if installed and runnable on this CPU, else
    ``(None, why not)`` (an empty reason where none is installed)."""
    try:
        module = importlib.import_module(cpu_spec("DEFAULT", portable=True).module)
    except ModuleNotFoundError:
        return None, ""
    except ImportError as error:  # built against another torch (undefined symbols) or a missing library
        return None, f"the ahead-of-time build does not load ({error})"
    compiled = module.capability()
    if CPU_CAPABILITIES.index(compiled) > CPU_CAPABILITIES.index(_capability()):
        return None, f"the ahead-of-time build needs {compiled}, this CPU runs {_capability()}"
    return module, f"ahead-of-time build ({compiled})"


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[object], str]:
    """The compiled extension and how it was had, or ``(None, why not)``. One attempt per process."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None, f"disabled by {DISABLE_ENV}=1"
    module, how = _ahead_of_time()
    if module is not None:
        return module, how
    aot = f"{how}; " if how else ""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"{aot}no C++ compiler ({compiler!r} not found; set CXX)"
    if not is_ninja_available():
        return None, f"{aot}ninja is not installed (pip install ninja)"
    capability = _capability()
    spec = cpu_spec(capability, portable=False)
    missing = spec.missing_sources()
    if missing:
        return None, f"{aot}the kernel sources are missing from the installed package: {', '.join(missing)}"
    directory = spec.jit_directory()
    if not spec.jit_built():
        print(f"ptv2_kernels: building the fused CPU kernel for {capability} (first use, about a minute; cached in "
              f"{directory})", file=sys.stderr, flush=True)
    try:
        module = spec.jit_load()
    except BuildError as error:
        return None, f"{aot}building it failed; compiler output in {error.log}"
    return module, f"JIT build {directory.name} ({capability})"


def cpu_kernel_status() -> Tuple[bool, str]:
    """``(available, how it was built or why it is not)``; builds the extension on the first call."""
    module, reason = _load()
    return module is not None, reason


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"ptv2_kernels: the fused CPU kernel is unavailable ({reason}); backend='cpu' runs the "
                  "pure-PyTorch composition (backend='torch-ref') instead", RuntimeWarning, stacklevel=5)


def use_cpu_kernel(requested: str, device: torch.device) -> bool:
    """Whether a call that asked for ``requested`` (``auto``/``cpu``/``torch``/``torch-ref``) on ``device`` runs the
    fused CPU kernel: CPU tensors, not ``torch-ref``, and the extension is built (else a warning, once)."""
    return requested != "torch-ref" and device.type == "cpu" and _kernel_available()


@torch.compiler.assume_constant_result  # traced code takes the answer as a constant instead of tracing the build
def _kernel_available() -> bool:
    module, reason = _load()
    if module is None:
        _warn_fallback(reason)
    return module is not None


def _extension():
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"ptv2_kernels: the fused CPU kernel is unavailable: {reason}")
    return module


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


RELATIVE_PAD = 128  # table rows are read up to one query block (csrc/cpu/params.h: kBlockQ) past 2N - 1


def relative_tables(q, relative, scale: float, seq: int, backward: bool):
    """DeBERTa's c2p/p2c as the kernels' distance tables (``csrc/cpu/params.h``), from ``relative = (pos_key,
    pos_query, index)`` of a :class:`~ptv2_kernels.ops.disentangled.DisentangledBias`: ``(c2p_t [H, D, L],
    p2c_t [H, D, L] times the scale, p2c_rows [H, L, D] or None)`` in float32/float64 over the distance
    t = i - j + N - 1 (L = 2N - 1 + padding), None where a term is absent. Small: ``[H, 2N, D]``."""
    pos_key, pos_query, index = relative
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    distances = 2 * seq - 1
    index = index.long()

    def table(emb, row, factor, transposed):
        heads, _, dim = emb.shape
        gathered = emb.detach().to(acc)[:, index[row]] * factor  # [H, 2N - 1, D]
        if transposed:
            out = gathered.new_zeros(heads, dim, distances + RELATIVE_PAD)
            out[:, :, :distances] = gathered.transpose(1, 2)
        else:
            out = gathered.new_zeros(heads, distances + RELATIVE_PAD, dim)
            out[:, :distances] = gathered
        return out

    c2p = None if pos_key is None else table(pos_key, 0, 1.0, True)
    p2c = None if pos_query is None else table(pos_query, 1, scale, True)
    p2c_rows = None if pos_query is None or not backward else table(pos_query, 1, 1.0, False)
    return c2p, p2c, p2c_rows


def _fold_table(grad, emb, index, factor, seq):
    """Gradient of a distance table ``[H, D, L]`` summed into the embedding rows each distance reads."""
    if grad is None:
        return None
    per_distance = grad[:, :, :2 * seq - 1].transpose(1, 2) * factor  # [H, 2N - 1, D]
    rows = per_distance.new_zeros(emb.shape)
    return rows.index_add_(1, index.long(), per_distance).to(emb.dtype)


def cpu_forward(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, options: Options):
    """``(out, lse)``: out like q (padded ``[B, H, N, D]`` stored as ``[B, N, H, D]``, or packed
    ``[total, H, D]``), lse ``[B, H, N]`` float32 (float64 for float64 inputs; +inf where a row sees no
    column). ``bias`` in q's dtype or None; ``relative``: ``(pos_key, pos_query, index)`` of DeBERTa's terms or
    None; ``cu_seqlens`` int64 ``[B + 1]`` for packed rows or None."""
    dropout = options.dropout
    c2p, p2c, _ = (None,) * 3 if relative is None else relative_tables(q, relative, options.scale, q.shape[2], False)
    return _extension().forward(q, k, v, _unit_last(prefix_k), _unit_last(prefix_v), mask, task_ids, bias,
                                cu_seqlens, options.max_seqlen, options.scale, dropout.seed, dropout.p,
                                dropout.prefix_p, c2p, p2c)


def cpu_backward(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, out, lse,
                 options: Options, bias_grad: bool, relative_grads=(False, False)):
    """``(dq, dk, dv, dprefix_k, dprefix_v, dbias, dpos_key, dpos_query)``: dq/dk/dv like q; the prefix
    gradients ``[T, H, P, D]`` summed over the rows of each task in float32 (float64); dbias ``[B, H, N, N]`` in
    q's dtype if ``bias_grad`` else None; the relative embeddings' gradients (their dtype) where
    ``relative_grads`` asks for them, else None."""
    dropout = options.dropout
    seq = q.shape[2] if relative is not None else 0
    c2p, p2c, p2c_rows = (None,) * 3 if relative is None else relative_tables(q, relative, options.scale, seq, True)
    wants = [bool(w) and t is not None for w, t in zip(relative_grads, (c2p, p2c))]
    dq, dk, dv, dpk, dpv, dbias, dc2p, dp2c = _extension().backward(
        _unit_last(d_out.to(q.dtype)), q, k, v, _unit_last(prefix_k), _unit_last(prefix_v), mask, task_ids, bias,
        cu_seqlens, options.max_seqlen, out, lse, bias_grad, options.scale, dropout.seed, dropout.p, dropout.prefix_p,
        c2p, p2c, p2c_rows, *wants)
    dpos_key = _fold_table(dc2p, relative[0], relative[2][0], 1.0, seq) if wants[0] else None
    dpos_query = _fold_table(dp2c, relative[1], relative[2][1], options.scale, seq) if wants[1] else None
    return dq, dk, dv, dpk, dpv, dbias if bias_grad else None, dpos_key, dpos_query

