"""Serving many prefix-tuned tasks on one frozen backbone: mixed-task batches through the kernels' bank
path, packed variable-length inference, dynamic batching, an HTTP front and prefix checkpoints."""

from .engine import PrefixServer, Request, Result
from .heads import Head
from .packed import packed_forward

__all__ = ["PrefixServer", "Request", "Result", "Head", "packed_forward"]
