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
- Positions shift by P as transformers shifts them for a cache of length P (:mod:`.positions`), passed through the
  public ``position_ids`` argument of the embeddings (a pre-hook). Explicit ``position_ids`` are used as given.
- XLM-RoBERTa and CamemBERT (``xlm_roberta.py``) and ELECTRA (``electra.py``) are this layout under other names.
"""

import copy
from typing import Optional

import transformers
from torch import nn

from . import compat
from .base import BASE_POOLER, FIRST_TOKEN, ModelFamily, take_call

ATTENTION_NAME = "ptv2_prefix_attention"
_FORWARD_ARGUMENTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_EMBEDDING_ARGUMENTS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")
_ATTENTION_ATTRIBUTES = ("query", "key", "value", "attention_head_size", "scaling")


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


class BertLike(ModelFamily):
    """The BERT layout, which RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA share:
    ``base.encoder.layer[i].attention.self`` (``query``/``key``/``value``, routed through the ``AttentionInterface``),
    absolute positions in ``base.embeddings``. ``BertLike(model_type, "Prefix")`` names transformers'
    ``modeling_<model_type>`` classes ``PrefixModel``, ``PrefixSelfAttention`` and ``PrefixEmbeddings``;
    ``positions_after_padding_idx`` selects RoBERTa's numbering, ``sequence_head`` how its sequence classifier
    reads a sequence."""

    def __init__(self, name: str, class_prefix: str, *, positions_after_padding_idx: bool = False,
                 sequence_head: str = FIRST_TOKEN, reference_backbone: Optional[str] = None):
        self.name = name
        self.module_path = f"transformers.models.{name.replace('-', '_')}.modeling_{name.replace('-', '_')}"
        self.base_class = f"{class_prefix}Model"
        self.attention_class = f"{class_prefix}SelfAttention"
        self.embeddings_class = f"{class_prefix}Embeddings"
        self.positions_after_padding_idx = positions_after_padding_idx
        self.sequence_head = sequence_head
        self.reference_backbone = reference_backbone

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
        wanted = ["position_embeddings"] + ["padding_idx"] * self.positions_after_padding_idx
        compat.require_attributes(embeddings, wanted, f"{self.base_class}.embeddings")
        if not isinstance(embeddings.position_embeddings, nn.Embedding):
            raise compat.LayoutError(f"{self.base_class}.embeddings.position_embeddings is not an nn.Embedding "
                                     "(absolute positions)")
        for index, layer in enumerate(base_model.encoder.layer):
            attention = layer.attention.self
            if not isinstance(getattr(attention, "config", None), transformers.PreTrainedConfig):
                raise compat.LayoutError(f"{self.attention_class} (layer {index}) has no config to look its attention "
                                         "function up in")
            compat.require_attributes(attention, _ATTENTION_ATTRIBUTES, f"{self.attention_class} (layer {index})")

    def route_attention(self, module: nn.Module):
        return _RoutedAttention(module)

    def project(self, module, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
        return tuple(projection(hidden_states).view(shape).transpose(-3, -2)
                     for projection in (module.query, module.key, module.value))

    def score_scale(self, module, head_dim):
        return module.scaling


BERT = BertLike("bert", "Bert", sequence_head=BASE_POOLER, reference_backbone="bert")
ROBERTA = BertLike("roberta", "Roberta", positions_after_padding_idx=True, reference_backbone="roberta")
