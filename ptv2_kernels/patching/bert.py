"""BERT and RoBERTa (transformers 5 ``modeling_bert`` / ``modeling_roberta``), SPEC §2.

- Self-attention: transformers' own module computes ``query``/``key``/``value`` (biases included) and calls the
  attention function of its config's ``_attn_implementation`` from the public ``AttentionInterface``. A patched
  module gets its own shallow copy of the config whose implementation is :data:`ATTENTION_NAME`, registered
  here: :func:`prefix_attention_interface` attends with :func:`ptv2_kernels.prefix_attention` over the layer's
  prefix (no bias on the prefix) at the ``scaling`` and ``dropout`` transformers passes. Only the patched
  modules change: the model's config, its mask creation and its unpatched layers (prompt depth) keep the
  implementation they had (eager, sdpa, flash...). The patched layers ignore transformers' attention mask (the
  forward's :class:`~ptv2_kernels.patching.base.PrefixCall` carries the 2D padding mask), so no mask function is
  needed; the name is registered with the ``AttentionMaskInterface`` too, with one that refuses to run, so that a
  model whose whole config names it fails loudly instead of getting ``mask=None`` (padding silently dropped).
- Positions shift by P as transformers shifts them for a cache of length P, passed through the public
  ``position_ids`` argument of the embeddings (a pre-hook): BERT ``P … P+N-1``; RoBERTa non-pad tokens
  ``padding_idx + P + cumsum``, pads ``padding_idx``; with ``inputs_embeds`` RoBERTa numbers positions
  ``padding_idx + 1 …`` without the shift, as transformers and PEFT do. Explicit ``position_ids`` are used as given.
"""

import copy
import functools

import torch
import transformers
from torch import nn

from . import compat
from .base import ModelFamily, bound_arguments, take_call

ATTENTION_NAME = "ptv2_prefix_attention"
_FORWARD_ARGUMENTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_EMBEDDING_ARGUMENTS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")


def prefix_attention_interface(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                               **kwargs):
    """The ``AttentionInterface`` function of :data:`ATTENTION_NAME`: ``query``/``key``/``value``
    ``[B, H, N, D]`` as the module projected them; returns ``(out [B, N, H, D], None)`` (no attention weights).
    ``attention_mask`` (transformers' 4D mask) is not read: the call carries the 2D padding mask."""
    call = take_call(kwargs)
    out = call.attend(module, query, key, value, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2), None


def _refuse_model_level_mask(*args, **kwargs):
    raise RuntimeError(f"{ATTENTION_NAME!r} is set on patched self-attention modules by ptv2_kernels.patch_model, "
                       "never as a whole model's attn_implementation (it has no attention mask of its own)")


transformers.AttentionInterface.register(ATTENTION_NAME, prefix_attention_interface)
transformers.AttentionMaskInterface.register(ATTENTION_NAME, _refuse_model_level_mask)


class _RoutedAttention:
    """The handle of one routed self-attention module: ``module.config`` is a shallow copy of its config naming
    :data:`ATTENTION_NAME`; ``remove()`` puts the original config object back."""

    def __init__(self, module: nn.Module):
        self.module, self.config = module, module.config
        routed = copy.copy(module.config)
        routed._attn_implementation = ATTENTION_NAME
        module.config = routed

    def remove(self) -> None:
        self.module.config = self.config


def _position_hook(prefix_len: int, first_position: int, max_positions: int, padding_idx):
    """Embeddings pre-hook: when no ``position_ids`` are given, pass them explicitly (the public argument),
    shifted by P as transformers shifts them for a cache of length P: BERT ``P … P+N-1``; RoBERTa
    (``padding_idx`` set) ``padding_idx + P + cumsum`` on non-pad tokens and ``padding_idx`` on pads, and for
    ``inputs_embeds`` ``padding_idx + 1 …`` unshifted (transformers cannot tell pads there and does not shift).
    Checks that the largest position fits ``max_position_embeddings`` before any kernel runs."""
    return functools.partial(_shift_positions, prefix_len, first_position, max_positions, padding_idx)


def _shift_positions(prefix_len, first_position, max_positions, padding_idx, embeddings, args, kwargs):
    bound = bound_arguments(embeddings, args, kwargs)
    arguments = bound.arguments
    if arguments.get("position_ids") is not None:
        return None
    inputs = arguments.get("input_ids")
    source = inputs if inputs is not None else arguments["inputs_embeds"]
    length = source.shape[1]
    shift = 0 if padding_idx is not None and inputs is None else prefix_len
    if first_position + shift + length > max_positions:
        raise ValueError(
            f"sequence length N={length} with prefix_len P={prefix_len} needs position ids up to "
            f"{first_position + shift + length - 1}, but max_position_embeddings is {max_positions}: "
            f"use N <= {max_positions - first_position - shift}")
    if padding_idx is not None and inputs is not None:
        real = inputs.ne(padding_idx).long()
        positions = (real.cumsum(1) + prefix_len) * real + padding_idx
    else:
        positions = torch.arange(first_position + shift, first_position + shift + length, device=source.device)
        positions = positions[None, :].expand(source.shape[0], length)
    arguments["position_ids"] = positions
    return bound.args, bound.kwargs


class _BertLike(ModelFamily):
    """BERT layout: ``base.encoder.layer[i].attention.self``, absolute positions in ``base.embeddings``."""

    def __init__(self, name: str, module_path: str, base_class: str, attention_class: str, embeddings_class: str,
                 positions_after_padding_idx: bool):
        self.name = name
        self.module_path = module_path
        self.base_class = base_class
        self.attention_class = attention_class
        self.embeddings_class = embeddings_class
        self._positions_after_padding_idx = positions_after_padding_idx

    def check_config(self, config) -> None:
        if config.is_decoder or config.add_cross_attention:
            raise ValueError(f"patch_model supports {self.name} as a bidirectional encoder; got config.is_decoder="
                             f"{config.is_decoder}, config.add_cross_attention={config.add_cross_attention}")

    def check_layout(self, base_model: nn.Module) -> None:
        """What the patch reads: the base forward's inputs and ``**kwargs`` (the prefix call travels down as a
        keyword, through the encoder, layer and attention forwards to the attention function); the embeddings'
        class, ``position_ids`` argument, ``position_embeddings`` (and RoBERTa's ``padding_idx``); each
        self-attention module's ``config`` (where its attention function is looked up)."""
        super().check_layout(base_model)
        module = self._module()
        compat.require_parameters(type(base_model).forward, _FORWARD_ARGUMENTS, f"{self.base_class}.forward")
        layer = base_model.encoder.layer[0]
        for where, obj in ((f"{self.base_class}.forward", base_model),
                           (f"{type(base_model.encoder).__name__}.forward", base_model.encoder),
                           (f"{type(layer).__name__}.forward", layer),
                           (f"{type(layer.attention).__name__}.forward", layer.attention),
                           (f"{self.attention_class}.forward", layer.attention.self)):
            compat.require_var_keyword(type(obj).forward, where)
        embeddings = getattr(base_model, "embeddings", None)
        embeddings_class = compat.require_module_class(module, self.embeddings_class, "embeddings")
        compat.require_instance(embeddings, embeddings_class, f"{self.base_class}.embeddings")
        compat.require_parameters(embeddings_class.forward, _EMBEDDING_ARGUMENTS, f"{self.embeddings_class}.forward")
        wanted = ["position_embeddings"] + ["padding_idx"] * self._positions_after_padding_idx
        compat.require_attributes(embeddings, wanted, f"{self.base_class}.embeddings")
        if not isinstance(embeddings.position_embeddings, nn.Embedding):
            raise compat.LayoutError(f"{self.base_class}.embeddings.position_embeddings is not an nn.Embedding "
                                     "(absolute positions)")
        for index, layer in enumerate(base_model.encoder.layer):
            config = getattr(layer.attention.self, "config", None)
            if not isinstance(config, transformers.PreTrainedConfig):
                raise compat.LayoutError(f"{self.attention_class} (layer {index}) has no config to look its attention "
                                         "function up in")

    def route_attention(self, module: nn.Module):
        return _RoutedAttention(module)

    def input_hooks(self, base_model: nn.Module, prefix_len: int) -> list:
        embeddings = base_model.embeddings
        first_position = embeddings.padding_idx + 1 if self._positions_after_padding_idx else 0
        padding_idx = embeddings.padding_idx if self._positions_after_padding_idx else None
        hook = _position_hook(prefix_len, first_position, embeddings.position_embeddings.num_embeddings, padding_idx)
        return [embeddings.register_forward_pre_hook(hook, with_kwargs=True)]


BERT = _BertLike("bert", "transformers.models.bert.modeling_bert", "BertModel", "BertSelfAttention", "BertEmbeddings",
                 positions_after_padding_idx=False)
ROBERTA = _BertLike("roberta", "transformers.models.roberta.modeling_roberta", "RobertaModel", "RobertaSelfAttention",
                    "RobertaEmbeddings", positions_after_padding_idx=True)
