"""ptv2_kernels: fused prefix attention for deep prefix tuning (P-Tuning v2) of encoder models.

The prefix keys/values of every layer are read from a compact ``[H, P, D]`` buffer (or a
``[T, H, P, D]`` bank) and never expanded over the batch or concatenated with the sequence.
"""

import os
import sys

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (dynamic version), so the metadata equals it


def _use_triton_interpreter_without_gpu() -> None:
    """On a machine without a CUDA GPU, compiled Triton cannot run at all, so import Triton in
    interpreter mode (TRITON_INTERPRET=1) for ``backend="triton"`` on CPU tensors. Triton reads the
    variable when its modules are imported, so this only helps if triton was not imported yet."""
    import torch

    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_use_triton_interpreter_without_gpu()

from .baselines import concat_prefix_attention  # noqa: E402
from .ops.disentangled import DisentangledBias  # noqa: E402
from .ops.prefix_attention import prefix_attention, prefix_attention_varlen  # noqa: E402
from .patching import load_prefix, patch_model, unpatch_model  # noqa: E402
from .prefix_encoder import PrefixConfig, PrefixEncoder, save_prefix  # noqa: E402
from .peft_adapter import export_peft_adapter, load_peft_adapter  # noqa: E402

__all__ = ["prefix_attention", "prefix_attention_varlen", "concat_prefix_attention", "DisentangledBias"]
__all__ += ["patch_model", "unpatch_model", "PrefixEncoder", "PrefixConfig", "save_prefix", "load_prefix"]
__all__ += ["export_peft_adapter", "load_peft_adapter"]
from .serving import PrefixServer, Request  # noqa: E402
__all__ += ["PrefixServer", "Request"]
