"""BERT and RoBERTa (transformers 5 ``modeling_bert`` / ``modeling_roberta``), SPEC §2.

- Self-attention: the module's own ``query``/``key``/``value`` projections (biases included), then
  :func:`ptv2_kernels.prefix_attention` over the layer's prefix (no bias on the prefix), scale
  ``1/sqrt(D)``, attention dropout ``attention_probs_dropout_prob`` in training.
- Positions shift by P as transformers does for ``past_key_values`` of length P: the embeddings are
  called with ``past_key_values_length`` increased by P, so BERT uses ``P … P+N-1`` and RoBERTa gives
  non-pad tokens ``padding_idx + P + cumsum`` (with ``inputs_embeds`` RoBERTa numbers positions without
  the shift, as transformers and PEFT do). Explicit ``position_ids`` are used as given.
"""

import functools

import torch
from torch import nn

from .base import ModelFamily, bound_arguments, take_call


def _self_attention_forward(module: nn.Module, slot: int, hidden_states, attention_mask=None, past_key_values=None,
                            **kwargs):
    """``BertSelfAttention.forward`` with the prefix joined in the kernel. transformers' ``attention_mask``
    (4D, in the format of ``config._attn_implementation``) is not used: the call carries the 2D padding mask."""
    call = take_call(kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(hidden_shape).transpose(1, 2) for proj in (module.query, module.key, module.value))
    dropout_p = module.dropout.p if module.training else 0.0
    out = call.attend(slot, q, k, v, scale=module.scaling, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(*input_shape, -1), None


def _position_hook(prefix_len: int, first_position: int, max_positions: int, padding_idx):
    """Embeddings pre-hook: when no ``position_ids`` are given, pass them explicitly (the public argument),
    shifted by P as transformers shifts them for a cache of length P: BERT ``P … P+N-1``; RoBERTa
    (``padding_idx`` set) ``padding_idx + P + cumsum`` on non-pad tokens and ``padding_idx`` on pads, and for
    ``inputs_embeds`` ``padding_idx + 1 …`` unshifted (transformers cannot tell pads there and does not shift).
    Checks ``first_position + P + N <= max_position_embeddings`` before any kernel runs."""
    return functools.partial(_shift_positions, prefix_len, first_position, max_positions, padding_idx)


def _shift_positions(prefix_len, first_position, max_positions, padding_idx, embeddings, args, kwargs):
    bound = bound_arguments(embeddings, args, kwargs)
    arguments = bound.arguments
    if arguments.get("position_ids") is not None:
        return None
    inputs = arguments.get("input_ids")
    embeds = arguments.get("inputs_embeds")
    length = (inputs if inputs is not None else embeds).shape[1]
    if first_position + prefix_len + length > max_positions:
        raise ValueError(
            f"sequence length N={length} with prefix_len P={prefix_len} needs position ids up to "
            f"{first_position + prefix_len + length - 1}, but max_position_embeddings is {max_positions}: "
            f"use N <= {max_positions - first_position - prefix_len}")
    device = (inputs if inputs is not None else embeds).device
    if padding_idx is None:
        positions = torch.arange(prefix_len, prefix_len + length, device=device)[None, :]
    elif inputs is not None:
        real = inputs.ne(padding_idx).long()
        positions = (real.cumsum(1) + prefix_len) * real + padding_idx
    else:
        positions = torch.arange(padding_idx + 1, padding_idx + 1 + length, device=device)[None, :]
    arguments["position_ids"] = positions.expand(*(inputs if inputs is not None else embeds).shape[:2])
    return bound.args, bound.kwargs


class _BertLike(ModelFamily):
    """BERT layout: ``base.encoder.layer[i].attention.self``, absolute positions in ``base.embeddings``."""

    def __init__(self, name: str, module_path: str, base_class: str, attention_class: str,
                 positions_after_padding_idx: bool):
        self.name = name
        self._positions_after_padding_idx = positions_after_padding_idx
        self.module_path = module_path
        self.base_class = base_class
        self.attention_class = attention_class

    def check_config(self, config) -> None:
        if config.is_decoder or config.add_cross_attention:
            raise ValueError(f"patch_model supports {self.name} as a bidirectional encoder; got config.is_decoder="
                             f"{config.is_decoder}, config.add_cross_attention={config.add_cross_attention}")

    def patched_forward(self, module: nn.Module, slot: int):
        return functools.partial(_self_attention_forward, module, slot)

    def input_hooks(self, base_model: nn.Module, prefix_len: int) -> list:
        embeddings = base_model.embeddings
        first_position = embeddings.padding_idx + 1 if self._positions_after_padding_idx else 0
        padding_idx = embeddings.padding_idx if self._positions_after_padding_idx else None
        hook = _position_hook(prefix_len, first_position, embeddings.position_embeddings.num_embeddings, padding_idx)
        return [embeddings.register_forward_pre_hook(hook, with_kwargs=True)]


BERT = _BertLike("bert", "transformers.models.bert.modeling_bert", "BertModel", "BertSelfAttention",
                 positions_after_padding_idx=False)
ROBERTA = _BertLike("roberta", "transformers.models.roberta.modeling_roberta", "RobertaModel", "RobertaSelfAttention",
                    positions_after_padding_idx=True)
