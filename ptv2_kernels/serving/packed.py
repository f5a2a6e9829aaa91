"""Packed variable-length inference for bank-patched models of every family that serves packed rows
(``ModelFamily.serves_packed``: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DeBERTa, DeBERTa-v2/v3), no padding
tokens anywhere. The patched model's family (kept on its patch state) says how to embed, project, scale and bias.

Inference only: walks the patched model's own modules on ``[total, hidden]`` token states. Embeddings, dense
layers and LayerNorms are token-wise, so they run on the packed tokens unchanged; only positions, self-attention
and DeBERTa-v2's convolution need the sequence boundaries ``cu_seqlens`` (FlashAttention's convention). Every
layer attends with :func:`ptv2_kernels.prefix_attention_varlen`: prefixed layers over their task's prefix, layers
without one (prompt depth) over an empty prefix (P = 0), i.e. plain attention within each sequence.

- Absolute positions shift by P as the padded patch does (the family's
  :class:`~ptv2_kernels.patching.positions.Positions`, one numbering for both).
- DeBERTa's c2p/p2c reach the kernel as a :class:`~ptv2_kernels.DisentangledBias` over transformers' relative
  positions of the longest row (``max_seqlen``): the kernels gather them by positions within each row, so every
  row gets the terms of its own length, as in a padded batch. The relative embeddings and their projections are
  the patched layers' own (``ptv2_kernels.patching.deberta``), after the encoder's ``get_rel_embedding``.
- DeBERTa-v2's convolution layer (after layer 0, ``conv_kernel_size > 0``) runs the encoder's own ``ConvLayer``
  on the packed tokens with ``(kernel_size - 1) // 2`` zero rows between sequences, so no window crosses a
  sequence boundary (what the padded model's zeroed padding does).
"""

import torch
from torch import nn

from ..ops.prefix_attention import prefix_attention_varlen
from ..patching import patch_state


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[total]``: the sequence index of every packed token."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths)


def _packed_conv(conv: nn.Module, embedded: torch.Tensor, layer_out: torch.Tensor, cu_seqlens, segments
                 ) -> torch.Tensor:
    """DeBERTa-v2's ``ConvLayer`` on packed tokens: each sequence is preceded by ``(kernel - 1) // 2`` zero rows
    (and the last followed by as many), so every window sees its own sequence and zeros, as in a padded batch."""
    gap = (conv.conv.kernel_size[0] - 1) // 2
    total, batch = embedded.shape[0], cu_seqlens.shape[0] - 1
    slots = torch.arange(total, device=embedded.device) + gap * (segments + 1)
    width = total + gap * (batch + 1)

    def spread(x):
        return x.new_zeros(width, *x.shape[1:]).index_copy(0, slots, x)[None]

    mask = torch.zeros(width, dtype=torch.long, device=embedded.device).index_fill(0, slots, 1)
    return conv(spread(embedded), spread(layer_out), mask[None])[0].index_select(0, slots)


def packed_forward(model: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, task_ids: torch.Tensor,
                   token_type_ids=None) -> torch.Tensor:
    """Final token states ``[total, hidden]`` of a model patched with a bank (``num_tasks > 1``).

    ``input_ids`` ``[total]`` packed by ``cu_seqlens`` ``[B + 1]``; ``task_ids`` ``[B]``; ``token_type_ids``
    ``[total]`` or None (zeros). Call it in eval mode under ``torch.inference_mode``; equals the padded
    model's states on real tokens (up to float rounding).
    """
    state = patch_state(model)
    family, encoder = state.family, state.encoder
    if encoder.config.num_tasks < 2:
        raise ValueError("packed_forward needs a model patched with a prefix bank (patch_model(..., num_tasks>1))")
    config = encoder.config
    base = model.base_model
    family.check_packed(base)
    segments = segment_ids(cu_seqlens)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    positions = family.positions(base, config.prefix_len)
    if positions is not None:
        positions = positions.packed(input_ids, cu_seqlens, segments, max_seqlen)[None]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    hidden = family.embed(base, input_ids[None], token_type_ids[None], positions)[0]
    bank = encoder().to(hidden.dtype)  # [T, L', 2, H, P, D]
    slots = {layer: slot for slot, layer in enumerate(config.layers)}
    relative = family.relative_terms(base, max_seqlen, hidden)
    embedded, conv = hidden, family.packed_conv(base)
    for index, layer in enumerate(base.encoder.layer):
        module = layer.attention.self
        q, k, v = (t[0].transpose(0, 1) for t in family.project(module, hidden[None]))  # [total, H, D] views
        scale = family.score_scale(module, q.shape[-1])
        if index in slots:
            prefix, rows_task = bank[:, slots[index]], task_ids
            prefix_k, prefix_v = prefix[:, 0], prefix[:, 1]
        else:  # outside the prompt depth: an empty prefix, plain attention within each sequence
            prefix_k = prefix_v = q.new_zeros(q.shape[1], 0, q.shape[2])
            rows_task = None
        attended = prefix_attention_varlen(
            q, k, v, prefix_k, prefix_v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, task_ids=rows_task,
            scale=scale, disentangled_bias=None if relative is None else relative.of(module, q.dtype),
            backend=state.backend)
        attention_output = layer.attention.output(attended.flatten(1), hidden)
        out = layer.output(layer.intermediate(attention_output), attention_output)
        if index == 0 and conv is not None:
            out = _packed_conv(conv, embedded, out, cu_seqlens, segments)
        hidden = out
    return hidden
