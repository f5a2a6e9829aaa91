"""Dropout RNG contract v2 in PyTorch: the keep masks every backend derives from a call's seed.

Philox4x32-10 with key ``(seed & 0xffffffff, seed >> 32)``; all four output words of a call are used.
Element ``x`` of a run of consecutive elements reads word ``x & 3`` of the call with counter
``(x >> 2, c1, c2, stream)`` and is kept iff ``(word >> 8) >= round(p * 2**24)``:

- attention probability of row b, head h, query i, column c (prefix columns first): ``(c >> 2, i, b*H + h, 0)``;
- prefix key (value) element (b, h, position j, dim d): ``(d >> 2, j, b*H + h, 1)`` (stream 2 for values).

The fused kernels compute the same words in-kernel (``csrc/cpu/philox.h``, the Triton and CUDA kernels);
this module is what the pure-PyTorch reference path (``torch_ref_backend.py``) draws its masks from. Words are
uint32 values held in int64 tensors; the 32x32-bit products are split over the multiplier's 16-bit halves
so that nothing exceeds 63 bits. Works on any device.
"""

import torch

_WORD = 0xFFFFFFFF
_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
ATTENTION, PREFIX_KEYS, PREFIX_VALUES = 0, 1, 2


def _wide_product(x: torch.Tensor, multiplier: int):
    """(high, low) 32-bit words of ``x * multiplier`` for uint32 ``x`` in int64: with
    ``multiplier = m1·2^16 + m0``, ``x·m0`` and ``x·m1`` are below 2^48."""
    low_part = x * (multiplier & 0xFFFF)
    high_part = x * (multiplier >> 16)
    carry = (low_part >> 16) + high_part  # product = carry·2^16 + (low_part mod 2^16)
    low = ((carry & 0xFFFF) << 16) | (low_part & 0xFFFF)
    return carry >> 16, low


def philox4x32(seed: int, counter) -> tuple:
    """The four output words of Philox4x32-10 for counters ``counter = (c0, c1, c2, c3)`` (tensors or ints,
    broadcast together) under ``seed``."""
    words = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in counter))
    c0, c1, c2, c3 = words
    key0, key1 = seed & _WORD, (seed >> 32) & _WORD
    for _ in range(10):
        high_a, low_a = _wide_product(c0, _ROUND_MULTIPLIERS[0])
        high_b, low_b = _wide_product(c2, _ROUND_MULTIPLIERS[1])
        c0, c1, c2, c3 = high_b ^ c1 ^ key0, low_b, high_a ^ c3 ^ key1, low_a
        key0 = (key0 + _KEY_INCREMENTS[0]) & _WORD
        key1 = (key1 + _KEY_INCREMENTS[1]) & _WORD
    return c0, c1, c2, c3


def keep_run(seed: int, p: float, length: int, c1: torch.Tensor, c2: torch.Tensor, stream: int) -> torch.Tensor:
    """Keep mask ``[..., length]`` of runs of ``length`` consecutive elements whose other counters are
    ``c1``, ``c2`` (broadcast together to the leading shape): element x reads word ``x & 3`` of counter
    ``(x >> 2, c1, c2, stream)``."""
    groups = torch.arange((length + 3) // 4, device=c1.device)
    c1, c2 = c1.unsqueeze(-1), c2.unsqueeze(-1)
    words = torch.stack(philox4x32(seed, (groups, c1, c2, stream)), -1)  # [..., groups, 4]: x = 4 g + w
    words = words.flatten(-2)[..., :length]
    return (words >> 8) >= round(p * (1 << 24))


def attention_keep(seed: int, p: float, batch: int, heads: int, seq: int, num_prefix: int,
                   device: torch.device) -> torch.Tensor:
    """Keep mask ``[B, H, N, P + N]`` of the attention probabilities (columns: prefix first)."""
    batch_head = torch.arange(batch * heads, device=device).view(batch, heads, 1)
    query = torch.arange(seq, device=device).view(1, 1, seq)
    return keep_run(seed, p, num_prefix + seq, query, batch_head, ATTENTION)


def prefix_keep(seed: int, p: float, batch: int, heads: int, num_prefix: int, dim: int, stream: int,
                device: torch.device) -> torch.Tensor:
    """Keep mask ``[B, H, P, D]`` of the per-row prefix keys (``stream=PREFIX_KEYS``) or values."""
    batch_head = torch.arange(batch * heads, device=device).view(batch, heads, 1)
    position = torch.arange(num_prefix, device=device).view(1, 1, num_prefix)
    return keep_run(seed, p, dim, position, batch_head, stream)
