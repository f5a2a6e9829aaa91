"""What every backend receives: a validated, normalised call (see ``prefix_attention.py``)."""

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class Dropout:
    """Dropout of one call: ``p`` on attention probabilities (prefix columns included), ``prefix_p`` on
    the prefix K/V elements with an independent mask per batch row, both drawn from ``seed`` (an int, or the
    0-dim int64 tensor of ``ptv2::dropout_seed`` that the registered op receives)."""

    p: float = 0.0
    prefix_p: float = 0.0
    seed: Union[int, torch.Tensor] = 0

    @property
    def active(self) -> bool:
        return self.p > 0.0 or self.prefix_p > 0.0


@dataclass(frozen=True)
class Options:
    """Non-tensor arguments of one call. ``task_ids is None`` means one prefix shared by every row."""

    scale: float
    dropout: Dropout
    deterministic: bool = False
    max_seqlen: int = 0  # packed calls: the longest row (N of the kernels' grid and lse layout)


def prefix_rows(prefix: torch.Tensor, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The prefix each batch row reads: ``[H, P, D]`` shared (a view of task 0, no copy) or, for a bank,
    ``[B, H, P, D]`` gathered by ``task_ids``. ``prefix`` is ``[T, H, P, D]``."""
    return prefix[0] if task_ids is None else prefix[task_ids]


def reduce_prefix_grad(grad_rows: torch.Tensor, task_ids: Optional[torch.Tensor], num_tasks: int) -> torch.Tensor:
    """Inverse of :func:`prefix_rows`: sum per-row prefix gradients ``[B, H, P, D]`` (or a shared
    ``[H, P, D]`` one) into the ``[T, H, P, D]`` buffer, per task."""
    if grad_rows.dim() == 3:
        return grad_rows.unsqueeze(0)
    if task_ids is None:
        return grad_rows.sum(0, keepdim=True)
    out = grad_rows.new_zeros((num_tasks,) + tuple(grad_rows.shape[1:]))
    return out.index_add_(0, task_ids, grad_rows)
