"""Which file runs each backend: the table the public ops and the registered op read.

A backend string names what runs and the module that runs it (``ops/<module>.py``): ``"triton"`` the Triton
kernels, ``"cuda"`` the hand-written CUDA kernels, ``"cpu"`` the fused C++ CPU kernel, ``"torch-ref"`` the
pure-PyTorch composition. Every backend module exposes a forward and a backward of one signature
(:func:`forward`, :func:`backward`) and imports nothing above ``common``; modules are imported on first use
(Triton's import is heavy, and a backend that cannot run here must not break the others).
"""

import functools
import importlib
from typing import NamedTuple


class Backend(NamedTuple):
    """Where a backend's two passes live: ``ops/<module>.py``, functions ``forward`` and ``backward``."""

    module: str
    forward: str
    backward: str


BACKENDS = {
    "triton": Backend("triton_backend", "triton_forward", "triton_backward"),
    "cuda": Backend("cuda_backend", "cuda_forward", "cuda_backward"),
    "cpu": Backend("cpu_backend", "cpu_forward", "cpu_backward"),
    "torch-ref": Backend("torch_ref_backend", "torch_ref_forward", "torch_ref_backward"),
}


@functools.lru_cache(maxsize=None)
def module(backend: str):
    """The module of ``backend`` (imported once)."""
    return importlib.import_module(f".{BACKENDS[backend].module}", __package__)


def forward(backend: str):
    """``fn(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, options) -> (out, lse or
    None)`` of ``backend``; ``relative`` is ``(pos_key, pos_query, index)`` of DeBERTa's terms or None."""
    return getattr(module(backend), BACKENDS[backend].forward)


def backward(backend: str):
    """``fn(d_out, q, k, v, prefix_k, prefix_v, mask, task_ids, bias, relative, cu_seqlens, out, lse, options,
    bias_grad, relative_grads) -> (dq, dk, dv, dprefix_k, dprefix_v, dbias, dpos_key, dpos_query)`` of
    ``backend``, None for a gradient not asked for; ``lse`` is what the forward returned."""
    return getattr(module(backend), BACKENDS[backend].backward)


def keeps_lse(backend: str, q, options) -> bool:
    """Whether ``backend``'s forward returns an lse for this call (only ``torch-ref`` may not)."""
    return backend != "torch-ref" or module(backend).flash_merge_available(q, options)
