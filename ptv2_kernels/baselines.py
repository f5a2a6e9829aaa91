"""The concatenation baseline: what P-Tuning v2 and PEFT do, kept for benchmarks and tests only.

The prefix is expanded over the batch (``[B, H, P, D]`` per layer), dropped out per row, concatenated
in front of the sequence keys/values and attended with an extended mask. This is the cost the fused
kernels remove; users of the package never reach it through ``prefix_attention``.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .ops.common import prefix_rows
from .ops.disentangled import DisentangledBias, bias_matrix
from .ops.validation import TORCH_DTYPES, Support, check_padded_call, check_qkv

SUPPORT = Support(TORCH_DTYPES, None, "concat_prefix_attention")


def concat_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    task_ids: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    prefix_dropout_p: float = 0.0,
    attn_bias: Optional[torch.Tensor] = None,
    disentangled_bias: Optional[DisentangledBias] = None,
    impl: str = "sdpa",
) -> torch.Tensor:
    """Same arguments and result as :func:`ptv2_kernels.prefix_attention`, computed by concatenation.

    ``impl="sdpa"`` uses ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (as
    transformers' ``sdpa`` attention does); ``impl="eager"`` computes scores, softmax and dropout in
    PyTorch (transformers' ``eager`` attention, with -inf rather than a large negative for padding).
    ``attn_bias`` ``[B, H, N, N]`` (or broadcastable) is padded with zeros over the prefix columns and added to
    the scaled scores (for sdpa: folded with the padding into one float mask ``[B, H, N, P + N]``);
    ``disentangled_bias`` is materialised into it as transformers does (``[B, H, N, 2·span]`` products gathered
    to ``[B, H, N, N]``).
    Dropout masks come from torch's global generator, so they differ from the fused kernels' masks.
    Arguments are validated by the op's own checks (:mod:`ptv2_kernels.ops.validation`, with the torch
    backend's dtypes), so both accept and refuse the same inputs with the same errors.
    """
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"impl must be 'sdpa' or 'eager', got {impl!r}")
    check_qkv(q, k, v)
    call = check_padded_call(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, task_ids=task_ids,
                             attn_bias=attn_bias, disentangled_bias=disentangled_bias, scale=scale,
                             dropout_p=dropout_p, prefix_dropout_p=prefix_dropout_p, support=SUPPORT)
    prefix_k, prefix_v, key_padding_mask, task_ids = call.prefix_k, call.prefix_v, call.mask, call.task_ids
    attn_bias, disentangled_bias, scale = call.bias, call.disentangled, call.scale
    batch, heads, seq, dim = q.shape
    num_prefix = prefix_k.shape[2]
    pk = prefix_rows(prefix_k, task_ids).expand(batch, heads, num_prefix, dim)
    pv = prefix_rows(prefix_v, task_ids).expand(batch, heads, num_prefix, dim)
    if prefix_dropout_p > 0:
        pk = F.dropout(pk, prefix_dropout_p)
        pv = F.dropout(pv, prefix_dropout_p)
    keys = torch.cat([pk, k], dim=2)
    values = torch.cat([pv, v], dim=2)
    mask = None
    if key_padding_mask is not None:
        visible_prefix = key_padding_mask.new_ones(batch, num_prefix)
        mask = torch.cat([visible_prefix, key_padding_mask], dim=1)[:, None, None, :]
    if disentangled_bias is not None:
        relative = bias_matrix(q, k, disentangled_bias, scale)
        attn_bias = relative if attn_bias is None else attn_bias + relative
    bias = None if attn_bias is None else F.pad(attn_bias, (num_prefix, 0))
    if impl == "sdpa":
        if bias is not None:
            mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p)
    return torch.matmul(probs, values)
