"""Packed variable-length inference for bank-patched BERT, RoBERTa, DeBERTa and DeBERTa-v2/v3 models (no
padding tokens anywhere).

Inference only: walks the patched model's own modules on ``[total, hidden]`` token states. Embeddings, dense
layers and LayerNorms are token-wise, so they run on the packed tokens unchanged; only positions, self-attention
and DeBERTa-v2's convolution need the sequence boundaries ``cu_seqlens`` (FlashAttention's convention). Every
layer attends with :func:`ptv2_kernels.prefix_attention_varlen`: prefixed layers over their task's prefix, layers
without one (prompt depth) over an empty prefix (P = 0), i.e. plain attention within each sequence.

- Absolute positions shift by P as the padded patch does: BERT (and DeBERTa with ``position_biased_input``)
  ``P … P+n-1`` per sequence, RoBERTa ``padding_idx + P + 1 …`` for non-pad tokens.
- DeBERTa's c2p/p2c reach the kernel as a :class:`~ptv2_kernels.DisentangledBias` over transformers' relative
  positions of the longest row (``max_seqlen``): the kernels gather them by positions within each row, so every
  row gets the terms of its own length, as in a padded batch. The relative embeddings and their projections are
  the patched layers' own (``ptv2_kernels.patching.deberta``), after the encoder's ``get_rel_embedding``.
- DeBERTa-v2's convolution layer (after layer 0, ``conv_kernel_size > 0``) runs the encoder's own ``ConvLayer``
  on the packed tokens with ``(kernel_size - 1) // 2`` zero rows between sequences, so no window crosses a
  sequence boundary (what the padded model's zeroed padding does).
"""

import math

import torch
from torch import nn

from .. import DisentangledBias, prefix_attention_varlen
from ..patching.base import STATE_ATTR
from ..patching.deberta import DEBERTA, DEBERTA_V2, _heads

DEBERTA_FAMILIES = {"deberta": DEBERTA, "deberta-v2": DEBERTA_V2}
PACKED_MODEL_TYPES = ("bert", "roberta", *DEBERTA_FAMILIES)


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


def _embed(base: nn.Module, input_ids, cu_seqlens, prefix_len: int, token_type_ids) -> torch.Tensor:
    """The embeddings of the packed tokens ``[total, hidden]``, absolute positions shifted by P."""
    embeddings, model_type = base.embeddings, base.config.model_type
    positions = None
    if embeddings.position_embeddings is not None:
        padding_idx = embeddings.padding_idx if model_type == "roberta" else None
        positions = packed_positions(input_ids, cu_seqlens, prefix_len, padding_idx)
        limit = embeddings.position_embeddings.num_embeddings
        if int(positions.max()) >= limit:
            raise ValueError(f"a sequence with prefix_len P={prefix_len} needs position id {int(positions.max())}, "
                             f"but max_position_embeddings is {limit}")
        positions = positions[None]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    return embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None], position_ids=positions)[0]


class _RelativeTerms:
    """DeBERTa's c2p/p2c per layer for packed rows of at most ``max_seqlen`` tokens: the index tables are built
    once per attention span, the projected relative embeddings per layer (as the padded patch does)."""

    def __init__(self, family, encoder: nn.Module, max_seqlen: int, probe: torch.Tensor):
        self.family, self.tables = family, {}
        self.embeddings = encoder.get_rel_embedding()
        self.positions = encoder.get_rel_pos(probe.new_empty(max_seqlen, 0))  # [1, N, N]; None: no relative terms

    def of(self, module: nn.Module, dtype: torch.dtype):
        """The layer's :class:`DisentangledBias`, or None (no relative attention or no c2p/p2c)."""
        if not (module.relative_attention and self.embeddings is not None and module.pos_att_type):
            return None
        span, rows = self.family.relative_rows(module, self.positions.shape[-1])
        if span not in self.tables:
            self.tables[span] = DisentangledBias.from_relative_positions(self.positions, span)
        embeddings = module.pos_dropout(self.embeddings)[rows]
        pos_key, pos_query = (None if projection is None else _heads(projection(embeddings), module, dtype)
                              for projection in self.family.relative_projections(module))
        return self.tables[span].with_embeddings(pos_key, pos_query)


def _packed_conv(conv: nn.Module, embedded: torch.Tensor, layer_out: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """DeBERTa-v2's ``ConvLayer`` on packed tokens: each sequence is preceded by ``(kernel - 1) // 2`` zero rows
    (and the last followed by as many), so every window sees its own sequence and zeros, as in a padded batch."""
    gap = (conv.conv.kernel_size[0] - 1) // 2
    total, batch = embedded.shape[0], cu_seqlens.shape[0] - 1
    slots = torch.arange(total, device=embedded.device) + gap * (segment_ids(cu_seqlens) + 1)
    width = total + gap * (batch + 1)

    def spread(x):
        return x.new_zeros(width, *x.shape[1:]).index_copy(0, slots, x)[None]

    mask = torch.zeros(width, dtype=torch.long, device=embedded.device).index_fill(0, slots, 1)
    return conv(spread(embedded), spread(layer_out), mask[None])[0].index_select(0, slots)


def _projections(module: nn.Module, family, hidden: torch.Tensor):
    """``q, k, v`` ``[total, H, D]`` (strided views) and the score scale of one self-attention module."""
    if family is None:  # BERT / RoBERTa
        shape = (hidden.shape[0], -1, module.attention_head_size)
        return [proj(hidden).view(shape) for proj in (module.query, module.key, module.value)], module.scaling
    q, k, v = (t[0].transpose(0, 1) for t in family.project(module, hidden[None]))
    return [q, k, v], 1.0 / math.sqrt(q.shape[-1] * (1 + len(module.pos_att_type)))


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
    model_type = base.config.model_type
    if model_type not in PACKED_MODEL_TYPES:
        raise TypeError(f"packed inference supports {PACKED_MODEL_TYPES} models, got model type {model_type!r}")
    family = DEBERTA_FAMILIES.get(model_type)
    if getattr(base, "z_steps", 0) > 1:
        raise ValueError(f"packed inference does not support DeBERTa's enhanced mask decoding (z_steps={base.z_steps})")
    hidden = _embed(base, input_ids, cu_seqlens, config.prefix_len, token_type_ids)
    bank = state.encoder().to(hidden.dtype)  # [T, L', 2, H, P, D]
    slots = {layer: slot for slot, layer in enumerate(config.layers)}
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    relative = None if family is None else _RelativeTerms(family, base.encoder, max_seqlen, hidden)
    embedded, conv = hidden, getattr(base.encoder, "conv", None)
    for index, layer in enumerate(base.encoder.layer):
        module = layer.attention.self
        (q, k, v), scale = _projections(module, family, hidden)
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
            out = _packed_conv(conv, embedded, out, cu_seqlens)
        hidden = out
    return hidden
