"""Absolute position ids shifted by the prefix length P, as transformers shifts them for a cache of length P: the
one statement of the numbering for the padded patch (an embeddings pre-hook, :mod:`~ptv2_kernels.patching.base`)
and for packed serving, and the one error for a sequence that does not fit ``max_position_embeddings``.

Two numberings exist: BERT's (and ELECTRA's, DeBERTa's absolute positions) counts every token from 0, so the
tokens get ``P … P+N-1``; RoBERTa's (XLM-RoBERTa, CamemBERT) gives real tokens ``padding_idx + P + 1 …`` in order
and pads ``padding_idx``. With ``inputs_embeds`` (no ids, so pads cannot be told apart) RoBERTa numbers the tokens
``padding_idx + 1 …`` without the shift, as transformers and PEFT do.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Positions:
    """The shifted positions of one patched model: ``first`` is a sequence's first position id without a prefix
    (0, or ``padding_idx + 1``), ``limit`` is ``max_position_embeddings``, ``padding_idx`` is set for RoBERTa's
    numbering (pads get it, real tokens count on from ``first``)."""

    prefix_len: int
    first: int
    limit: int
    padding_idx: Optional[int] = None

    @property
    def max_length(self) -> int:
        """The longest sequence N whose shifted positions fit ``max_position_embeddings``."""
        return self.limit - self.first - self.prefix_len

    def check(self, length: int, shift: Optional[int] = None) -> None:
        """ValueError (before any attention runs) if a sequence of ``length`` tokens, its positions shifted by
        ``shift`` (default P), needs a position id past ``max_position_embeddings``."""
        shift = self.prefix_len if shift is None else shift
        if self.first + shift + length > self.limit:
            raise ValueError(f"sequence length N={length} with prefix_len P={self.prefix_len} needs position ids up "
                             f"to {self.first + shift + length - 1}, but max_position_embeddings is {self.limit}: "
                             f"use N <= {self.limit - self.first - shift} (absolute positions shift by P)")

    def _numbered(self, real: Optional[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
        """Position ids from each token's 1-based count among its sequence's real tokens."""
        positions = counts + (self.first + self.prefix_len - 1)
        return positions if real is None else torch.where(real, positions, self.padding_idx)

    def padded(self, input_ids: Optional[torch.Tensor], shape, device) -> torch.Tensor:
        """``[B, N]`` position ids of a padded batch of ``shape`` ``(B, N)`` (``input_ids`` None: ``inputs_embeds``)."""
        batch, length = shape
        if self.padding_idx is not None and input_ids is None:  # RoBERTa over inputs_embeds: unshifted
            self.check(length, shift=0)
            return torch.arange(self.first, self.first + length, device=device)[None, :].expand(batch, length)
        self.check(length)
        if self.padding_idx is None:
            counts = torch.arange(1, length + 1, device=device)[None, :].expand(batch, length)
            return self._numbered(None, counts)
        real = input_ids.ne(self.padding_idx)
        return self._numbered(real, real.long().cumsum(1))

    def packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, segments: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:
        """``[total]`` position ids of sequences packed by ``cu_seqlens`` (``segments``: each token's sequence
        index; ``max_seqlen``: the longest sequence, checked)."""
        self.check(max_seqlen)
        real = None if self.padding_idx is None else input_ids.ne(self.padding_idx)
        running = (torch.ones_like(input_ids) if real is None else real.long()).cumsum(0)
        before = torch.cat([running.new_zeros(1), running])[cu_seqlens[:-1]]  # counted tokens before each sequence
        return self._numbered(real, running - before[segments])
