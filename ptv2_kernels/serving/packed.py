"""Packed variable-length inference for patched BERT/RoBERTa models (no padding tokens anywhere).

Inference only: walks the patched model's own modules on ``[total, hidden]`` token states. Embeddings,
dense layers and LayerNorms are token-wise, so they run on the packed tokens unchanged; only positions
and self-attention need the sequence boundaries ``cu_seqlens`` (FlashAttention's convention). Prefixed
layers attend with :func:`ptv2_kernels.prefix_attention_varlen` over their task's prefix; layers
without a prefix (prompt depth) run plain attention within each sequence.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import prefix_attention_varlen
from ..patching.base import STATE_ATTR

PACKED_MODEL_TYPES = ("bert", "roberta")


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[total]``: the sequence index of every packed token."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths)


def packed_positions(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, prefix_len: int, padding_idx) -> torch.Tensor:
    """Position ids shifted by P as the padded patch does: BERT ``P … P+n-1`` per sequence (``padding_idx``
    None); RoBERTa ``padding_idx + P + cumsum(non-pad)`` for non-pad tokens and ``padding_idx`` for pads."""
    segments = segment_ids(cu_seqlens)
    if padding_idx is None:
        return torch.arange(input_ids.shape[0], device=input_ids.device) - cu_seqlens[segments] + prefix_len
    real = (input_ids != padding_idx).long()
    running = real.cumsum(0)
    before = torch.cat([running.new_zeros(1), running])[cu_seqlens[:-1]]  # real tokens before each sequence
    within = running - before[segments]
    return torch.where(real.bool(), padding_idx + prefix_len + within, padding_idx)


def _plain_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    """Attention within each packed sequence without a prefix (layers outside the prompt depth)."""
    segments = segment_ids(cu_seqlens)
    position = torch.arange(q.shape[0], device=q.device) - cu_seqlens[segments]
    batch = cu_seqlens.shape[0] - 1

    def pad(x):  # [total, H, D] -> [B, H, N, D]
        return x.new_zeros(batch, max_seqlen, *x.shape[1:]).index_put((segments, position), x).transpose(1, 2)

    mask = torch.zeros(batch, max_seqlen, dtype=torch.bool, device=q.device)
    mask[segments, position] = True
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[segments, position]


def _self_attention(module: nn.Module, hidden: torch.Tensor, prefix, cu_seqlens, max_seqlen, task_ids, backend):
    """A BERT/RoBERTa self-attention module on packed ``[total, hidden]`` states; ``prefix``: this layer's
    ``[T, 2, H, P, D]`` bank slice, or None for a layer without a prefix."""
    shape = (hidden.shape[0], -1, module.attention_head_size)
    q, k, v = (proj(hidden).view(shape) for proj in (module.query, module.key, module.value))
    if prefix is None:
        out = _plain_attention(q, k, v, cu_seqlens, max_seqlen, module.scaling)
    else:
        out = prefix_attention_varlen(q, k, v, prefix[:, 0], prefix[:, 1], cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen, task_ids=task_ids, scale=module.scaling,
                                      backend=backend)
    return out.reshape(hidden.shape[0], -1)


def packed_forward(model: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, task_ids: torch.Tensor,
                   token_type_ids=None) -> torch.Tensor:
    """Final token states ``[total, hidden]`` of a model patched with a bank (``num_tasks > 1``).

    ``input_ids`` ``[total]`` packed by ``cu_seqlens`` ``[B + 1]``; ``task_ids`` ``[B]``; ``token_type_ids``
    ``[total]`` or None (zeros). Call it in eval mode under ``torch.inference_mode``; equals the padded
    model's states on real tokens (up to float rounding).
    """
    state = getattr(model, STATE_ATTR, None)
    if state is None or state.encoder.config.num_tasks < 2:
        raise ValueError("packed_forward needs a model patched with a prefix bank (patch_model(..., num_tasks>1))")
    config = state.encoder.config
    base = model.base_model
    if base.config.model_type not in PACKED_MODEL_TYPES:
        raise TypeError(f"packed inference supports {PACKED_MODEL_TYPES} models, got model type "
                        f"{base.config.model_type!r}")
    embeddings = base.embeddings
    padding_idx = embeddings.padding_idx if base.config.model_type == "roberta" else None
    positions = packed_positions(input_ids, cu_seqlens, config.prefix_len, padding_idx)
    if int(positions.max()) >= embeddings.position_embeddings.num_embeddings:
        raise ValueError(f"a sequence with prefix_len P={config.prefix_len} needs position id {int(positions.max())}, "
                         f"but max_position_embeddings is {embeddings.position_embeddings.num_embeddings}")
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    hidden = embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None],
                        position_ids=positions[None])[0]
    bank = state.encoder().to(hidden.dtype)  # [T, L', 2, H, P, D]
    slots = {layer: slot for slot, layer in enumerate(config.layers)}
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    for index, layer in enumerate(base.encoder.layer):
        prefix = bank[:, slots[index]] if index in slots else None
        attended = _self_attention(layer.attention.self, hidden, prefix, cu_seqlens, max_seqlen, task_ids,
                                   state.backend)
        hidden = layer.feed_forward_chunk(layer.attention.output(attended, hidden))
    return hidden
