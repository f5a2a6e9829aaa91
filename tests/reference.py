"""Independent float64 references for the tests: concatenation attention (SPEC §1) and the Philox4x32-10
dropout-mask contract (v2) of every backend, written from scratch in PyTorch integer arithmetic."""

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(const: int, x: torch.Tensor):
    """High and low 32-bit words of ``const * x`` for uint32 values held in int64 (split in 16-bit
    halves so nothing overflows 63 bits)."""
    lo_part = const * (x & 0xFFFF)
    hi_part = const * (x >> 16)
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    hi = (hi_part + (lo_part >> 16)) >> 16
    return hi, lo


def philox(seed: int, c0, c1, c2, c3) -> tuple:
    """The four output words of Philox4x32-10 with key ``(seed lo, seed hi)`` and counters ``c0..c3``."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def reference_attention(q, k, v, prefix_k, prefix_v, mask=None, task_ids=None, scale=None,
                        attn_keep=None, keep_k=None, keep_v=None, p=0.0, prefix_p=0.0, bias=None):
    """SPEC §1 by concatenation in float64 (``bias`` on the sequence columns only). Rows with no visible
    column output 0. Differentiable."""
    q, k, v, prefix_k, prefix_v = (t.double() for t in (q, k, v, prefix_k, prefix_v))
    batch, heads, seq, dim = q.shape
    pk = prefix_k[task_ids] if task_ids is not None else prefix_k.expand(batch, *prefix_k.shape)
    pv = prefix_v[task_ids] if task_ids is not None else prefix_v.expand(batch, *prefix_v.shape)
    if keep_k is not None:
        pk = pk * keep_k.to(q.device) / (1 - prefix_p)
        pv = pv * keep_v.to(q.device) / (1 - prefix_p)
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = q @ keys.transpose(-1, -2) * (dim**-0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + torch.nn.functional.pad(bias.double(), (pk.shape[2], 0))
    if mask is not None:
        visible = torch.cat([torch.ones(batch, pk.shape[2], dtype=torch.bool, device=q.device), mask], 1)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    if attn_keep is not None:
        probs = probs * attn_keep.to(q.device) / (1 - p)
    return probs @ values


# ----- RNG contract v2 (every backend): all four Philox outputs are used ---------------------------------------
# Element x of a row of consecutive elements (attention column c, or prefix element d) comes from the
# counter whose first word is x >> 2, output word x & 3. Keep iff (word >> 8) >= round(p * 2**24).
# (Contract v1, one call per element reading word 0 only, is gone: nothing uses it.)


def keep_mask_v2(seed: int, p: float, x, c1, c2, stream: int) -> torch.Tensor:
    """Contract v2: element ``x`` reads output word ``x & 3`` of the Philox call with counter
    ``(x >> 2, c1, c2, stream)``; keep iff ``(word >> 8) >= round(p * 2**24)``."""
    x = torch.as_tensor(x, dtype=torch.int64)
    words = torch.stack(torch.broadcast_tensors(*philox(seed, x >> 2, c1, c2, stream)), -1)
    word = words.gather(-1, torch.broadcast_to(x & 3, words.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (word >> 8) >= round(p * (1 << 24))


def dropout_masks_v2(seed, batch, heads, seq, num_prefix, dim, p, prefix_p):
    """Contract v2 masks: attention ``[B, H, N, P + N]`` (element (b, h, i, c): counter (c >> 2, i, b*H+h, 0),
    word c & 3) and prefix key/value ``[B, H, P, D]`` (element (b, h, j, d): counter (d >> 2, j, b*H+h, 1 for
    keys or 2 for values), word d & 3); None where the rate is 0."""
    bh = torch.arange(batch * heads).view(batch, heads, 1, 1)
    attn = keep_mask_v2(seed, p, torch.arange(num_prefix + seq).view(1, 1, 1, -1),
                        torch.arange(seq).view(1, 1, -1, 1), bh, 0) if p > 0 else None
    if prefix_p == 0:
        return attn, None, None
    d = torch.arange(dim).view(1, 1, 1, -1)
    j = torch.arange(num_prefix).view(1, 1, -1, 1)
    return attn, keep_mask_v2(seed, prefix_p, d, j, bh, 1), keep_mask_v2(seed, prefix_p, d, j, bh, 2)
