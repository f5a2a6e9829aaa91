"""DeBERTa (v1, ``modeling_deberta``) and DeBERTa-v2/v3 (``modeling_deberta_v2``) on transformers 5, SPEC §2.

- Self-attention: the module's own projections with their biases (v1: ``in_proj`` split, then ``q_bias`` and
  ``v_bias``; v2: ``query_proj``/``key_proj``/``value_proj``), then :func:`ptv2_kernels.prefix_attention` over
  the layer's prefix (no bias on the prefix), scale ``1/sqrt(D * (1 + len(pos_att_type)))``, attention dropout
  ``attention_probs_dropout_prob`` in training.
- The disentangled terms (c2p, p2c) reach the kernel as a :class:`~ptv2_kernels.DisentangledBias`: the layer's
  projected relative embeddings ``[H, 2·span, D]`` (v1: ``pos_proj``/``pos_q_proj`` over the
  ``max_relative_positions ± span`` rows, span ``min(N, max_relative_positions)``; v2: ``pos_key_proj``/
  ``pos_query_proj``, or ``key_proj``/``query_proj`` with ``share_att_key``, over the first ``2·pos_ebd_size``
  rows) after ``pos_dropout``, and the distance-to-row tables of transformers' relative positions (plain or log
  buckets), clamped as transformers clamps them (:class:`RelativeTerms`, which packed serving uses too). The Triton
  kernels gather c2p/p2c per tile (no ``[B, H, N, N]`` tensor); prefix columns get the content score only.
- Absolute positions (``position_biased_input=True`` only) shift by P, as the P-Tuning v2 reference's DeBERTa
  models do for ``past_key_values`` of length P: positions ``P … P+N-1`` (the embeddings pre-hook every family
  shares, :mod:`.positions`). Explicit ``position_ids`` are used as given. Relative positions are not shifted.

DeBERTa's model forward, unlike BERT's, does not pass extra keyword arguments down to its layers. So the base
model's instance ``forward`` takes this forward's :class:`PrefixCall`, and an encoder pre-hook hands it to every
layer inside the one argument the encoder passes through unchanged, ``relative_pos`` (a
:class:`_RelativePositions`, which gradient checkpointing also saves for its recomputation). Under
``torch.compile`` (dynamo cannot trace a tensor subclass that carries a Python object) the layers read the call
from the relay itself, which they reach as their ``RELAY_ATTR``; compiled gradient checkpointing recomputes
inside the compiled backward, without Python.
"""

import abc
import functools
import math
from typing import Optional

import torch
from torch import nn

from ..ops.disentangled import DisentangledBias
from . import compat
from .base import CONTEXT_POOLER, ModelFamily, PrefixCall, bound_arguments, take_call

SUPPORTED_POS_ATT_TYPES = ("c2p", "p2c")
_ATTENTION_ARGUMENTS = ("hidden_states", "attention_mask", "output_attentions", "query_states", "relative_pos",
                        "rel_embeddings")  # DisentangledSelfAttention.forward, which the patch replaces


RELAY_ATTR = "_ptv2_call_relay"  # on each DeBERTa self-attention module of a patched model: its _CallRelay


class _RelativePositions(torch.Tensor):
    """transformers' relative positions ``[1, N, N]`` (empty without relative attention) carrying ``call``, the
    forward's :class:`PrefixCall`. Operations on it return plain tensors, so unpatched layers (prompt depth)
    use it as the usual relative positions."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    call: PrefixCall
    _tables: dict

    @staticmethod
    def carry(positions: torch.Tensor, call: PrefixCall) -> "_RelativePositions":
        carrier = positions.as_subclass(_RelativePositions)
        carrier.call = call
        carrier._tables = {}
        return carrier


class _CallRelay:
    """Within one forward of the patched base model: hands its :class:`PrefixCall` to the encoder (``relative_pos``
    carrier). ``remove()`` undoes it (a handle for ``unpatch_model``).
    Bound methods and partials only, so ``copy.deepcopy`` of a patched model copies the relay with it."""

    def __init__(self, base_model: nn.Module):
        self.call: Optional[PrefixCall] = None
        self.tables: dict = {}  # compiled forwards: the index tables per span (eager ones: in the carrier)
        self._base = base_model
        self._previous_forward = base_model.__dict__.get("forward")
        forward = functools.partial(_relayed_forward, self, base_model.forward)
        base_model.forward = functools.update_wrapper(forward, base_model.forward)  # keeps the signature
        self._handle = base_model.encoder.register_forward_pre_hook(self._carry_call, with_kwargs=True)
        for layer in base_model.encoder.layer:
            setattr(layer.attention.self, RELAY_ATTR, self)

    def _carry_call(self, encoder, args, kwargs):
        """Encoder pre-hook: ``relative_pos`` = transformers' relative positions carrying the call."""
        if self.call is None:
            return None
        bound = bound_arguments(encoder, args, kwargs)
        arguments = bound.arguments
        if arguments.get("relative_pos") is not None or arguments.get("query_states") is not None:
            raise ValueError("a patched DeBERTa encoder computes its own relative positions and queries; "
                             "relative_pos and query_states must be None")
        if torch.compiler.is_compiling():  # the layers read the call from the relay
            return None
        hidden_states = arguments["hidden_states"]
        positions = encoder.get_rel_pos(hidden_states)
        if positions is None:  # no relative attention: the carrier holds no positions
            positions = torch.empty(0, dtype=torch.long, device=hidden_states.device)
        arguments["relative_pos"] = _RelativePositions.carry(positions, self.call)
        return bound.args, bound.kwargs

    def remove(self) -> None:
        self._handle.remove()
        for layer in self._base.encoder.layer:
            delattr(layer.attention.self, RELAY_ATTR)
        if self._previous_forward is None:
            del self._base.forward
        else:
            self._base.forward = self._previous_forward


def _relayed_forward(relay: _CallRelay, forward, *args, **kwargs):
    """The base model's ``forward`` with this forward's call (put into ``kwargs`` by the base-model pre-hook)
    held by ``relay`` for the duration."""
    relay.call = take_call(kwargs)
    try:
        return forward(*args, **kwargs)
    finally:
        relay.call = None
        relay.tables = {}


def _attention_forward(family: "_DebertaFamily", module: nn.Module, hidden_states, attention_mask,
                       output_attentions=False, query_states=None, relative_pos=None, rel_embeddings=None):
    """``DisentangledSelfAttention.forward`` (v1 and v2) with the prefix joined in the kernel and c2p + p2c as
    its ``disentangled_bias``. transformers' ``attention_mask`` (``m_i·m_j``) is not used: the call carries the
    2D padding mask. Returns ``(context [B, N, H·D], None)``."""
    if query_states is not None:
        raise ValueError("query_states (DeBERTa's enhanced mask decoding, z_steps > 1) is not supported by a "
                         "patched DeBERTa model")
    relay = getattr(module, RELAY_ATTR)
    if isinstance(relative_pos, _RelativePositions):  # eager: the carrier
        call, tables, relative_pos = relative_pos.call, relative_pos._tables, relative_pos.as_subclass(torch.Tensor)
    elif torch.compiler.is_compiling() and relay.call is not None:  # compiled: the relay
        call, tables = relay.call, relay.tables
    else:
        raise RuntimeError("a patched DeBERTa self-attention module was called outside a forward of its patched "
                           "model (no prefix call in relative_pos); call the model, or unpatch_model it first")
    q, k, v = family.project(module, hidden_states)
    terms = RelativeTerms(family, rel_embeddings, relative_pos, tables)
    out = call.attend(module, q, k, v, scale=family.score_scale(module, q.shape[-1]),
                      dropout_p=module.dropout.p if module.training else 0.0,
                      disentangled_bias=terms.of(module, q.dtype))
    return out.transpose(1, 2).flatten(2), None


class RelativeTerms:
    """DeBERTa's c2p/p2c terms of one forward, for the padded patch and packed serving alike: the encoder's relative
    embeddings ``rel_embeddings`` and transformers' relative positions ``relative_pos`` ``[1, N, N]`` (of the longest
    row when packed); the index tables are built once per attention span (kept in ``tables``), the projected
    relative embeddings per layer."""

    def __init__(self, family: "_DebertaFamily", rel_embeddings, relative_pos, tables: dict):
        self.family, self.embeddings, self.positions, self.tables = family, rel_embeddings, relative_pos, tables

    def of(self, module: nn.Module, dtype: torch.dtype) -> Optional[DisentangledBias]:
        """The layer's :class:`DisentangledBias` with its own projections (activations' ``dtype``), or None (no
        relative attention, or no c2p/p2c)."""
        if not (module.relative_attention and self.embeddings is not None and module.pos_att_type):
            return None
        span, rows = self.family.relative_rows(module, self.positions.shape[-1])
        if span not in self.tables:
            self.tables[span] = DisentangledBias.from_relative_positions(self.positions, span)
        embeddings = module.pos_dropout(self.embeddings)[rows]
        heads = module.num_attention_heads
        pos_key, pos_query = (None if projection is None else
                              projection(embeddings).unflatten(-1, (heads, -1)).transpose(0, 1).to(dtype)
                              for projection in self.family.relative_projections(module))
        return self.tables[span].with_embeddings(pos_key, pos_query)


class _DebertaFamily(ModelFamily):
    """DeBERTa layout: ``base.encoder.layer[i].attention.self``, ``base.embeddings``, ``base.encoder``."""

    attention_class = "DisentangledSelfAttention"
    disentangled = True
    sequence_head = CONTEXT_POOLER
    peft_format_covers = False  # PEFT's prefix tuning refuses DeBERTa, so no adapter file of it exists
    reference_backbone = "deberta"

    def check_config(self, config) -> None:
        """pos_att_type: distinct c2p/p2c only (so v1's and v2's score scales agree: 1 + len(pos_att_type))."""
        kinds = list(config.pos_att_type or [])
        if not set(kinds) <= set(SUPPORTED_POS_ATT_TYPES) or len(set(kinds)) != len(kinds):
            raise ValueError(f"patch_model supports config.pos_att_type made of distinct {SUPPORTED_POS_ATT_TYPES} "
                             f"for {self.name}; got {kinds}")

    def route_attention(self, module: nn.Module):
        return _ReplacedForward(module, functools.partial(_attention_forward, self, module))

    def check_layout(self, base_model: nn.Module) -> None:
        """What the patch reads: the embeddings' and encoder's classes, the arguments and attributes its hooks use,
        and the exact signature and attributes of the self-attention modules whose ``forward`` it replaces."""
        super().check_layout(base_model)
        module = self._module()
        for part, class_name, arguments, attributes in (
                ("embeddings", self.embeddings_class, ("input_ids", "position_ids", "inputs_embeds"),
                 ("position_embeddings",)),
                ("encoder", self.encoder_class, ("hidden_states", "relative_pos", "query_states"), ("get_rel_pos",))):
            cls = compat.require_module_class(module, class_name, part)
            compat.require_instance(getattr(base_model, part, None), cls, f"{self.base_class}.{part}")
            compat.require_parameters(cls.forward, arguments, f"{class_name}.forward")
            compat.require_attributes(getattr(base_model, part), attributes, f"{self.base_class}.{part}")
        attention_class = getattr(module, self.attention_class)
        compat.require_exact_parameters(attention_class.forward, _ATTENTION_ARGUMENTS,
                                        f"{self.attention_class}.forward")
        for index, layer in enumerate(base_model.encoder.layer):
            attention = layer.attention.self
            compat.require_attributes(attention, self.attention_attributes(attention),
                                      f"{self.attention_class} (layer {index})")

    def attention_attributes(self, attention: nn.Module) -> list:
        """The attributes of one self-attention module that the patched forward reads."""
        names = ["pos_att_type", "relative_attention", "dropout", "num_attention_heads", "transpose_for_scores"]
        return names + (["pos_dropout"] if getattr(attention, "relative_attention", False) else [])

    def input_hooks(self, base_model: nn.Module, prefix_len: int) -> list:
        return super().input_hooks(base_model, prefix_len) + [_CallRelay(base_model)]

    def score_scale(self, module, head_dim):
        """``1/sqrt(D * (1 + len(pos_att_type)))``: c2p and p2c each add a term of the content score's size."""
        return 1.0 / math.sqrt(head_dim * (1 + len(module.pos_att_type)))

    def relative_terms(self, base_model, seq_len, probe):
        encoder = base_model.encoder
        return RelativeTerms(self, encoder.get_rel_embedding(), encoder.get_rel_pos(probe.new_empty(seq_len, 0)), {})

    def check_packed(self, base_model):
        if getattr(base_model, "z_steps", 0) > 1:
            raise ValueError(f"packed inference does not support DeBERTa's enhanced mask decoding "
                             f"(z_steps={base_model.z_steps})")

    @abc.abstractmethod
    def project(self, module: nn.Module, hidden_states: torch.Tensor) -> tuple:
        """``q, k, v`` ``[B, H, N, D]`` with the projections' biases (strided views allowed)."""

    @abc.abstractmethod
    def relative_rows(self, module: nn.Module, seq_len: int) -> tuple:
        """``(span, rows)``: transformers' attention span and the slice of ``rel_embeddings`` it projects."""

    @abc.abstractmethod
    def relative_projections(self, module: nn.Module) -> tuple:
        """The projections of the relative embeddings for c2p (keys) and p2c (queries); None where the
        layer's ``pos_att_type`` lacks the term."""


class _ReplacedForward:
    """The handle of one self-attention module whose instance ``forward`` is ``forward``; ``remove()`` deletes it
    (the class's forward is back)."""

    def __init__(self, module: nn.Module, forward):
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        del self.module.forward


class _DebertaV1(_DebertaFamily):
    name = "deberta"
    module_path = "transformers.models.deberta.modeling_deberta"
    base_class = "DebertaModel"
    embeddings_class = "DebertaEmbeddings"
    encoder_class = "DebertaEncoder"

    def attention_attributes(self, attention):
        names = super().attention_attributes(attention) + ["in_proj", "q_bias", "v_bias", "talking_head"]
        if getattr(attention, "relative_attention", False):
            kinds = getattr(attention, "pos_att_type", [])
            names += ["max_relative_positions"] + ["pos_proj"] * ("c2p" in kinds) + ["pos_q_proj"] * ("p2c" in kinds)
        return names

    def check_config(self, config) -> None:
        super().check_config(config)
        if getattr(config, "talking_head", False):
            raise ValueError("patch_model does not support talking-heads DeBERTa (config.talking_head=True): the "
                             "head mixing of scores and probabilities does not fit the fused kernel")

    def project(self, module, hidden_states):
        q, k, v = module.transpose_for_scores(module.in_proj(hidden_states)).chunk(3, dim=-1)
        q = q + module.transpose_for_scores(module.q_bias[None, None, :])
        v = v + module.transpose_for_scores(module.v_bias[None, None, :])
        return q, k, v

    def relative_rows(self, module, seq_len):
        span = min(seq_len, module.max_relative_positions)
        return span, slice(module.max_relative_positions - span, module.max_relative_positions + span)

    def relative_projections(self, module):
        kinds = module.pos_att_type
        return (module.pos_proj if "c2p" in kinds else None), (module.pos_q_proj if "p2c" in kinds else None)


class _DebertaV2(_DebertaFamily):
    name = "deberta-v2"
    module_path = "transformers.models.deberta_v2.modeling_deberta_v2"
    base_class = "DebertaV2Model"
    embeddings_class = "DebertaV2Embeddings"
    encoder_class = "DebertaV2Encoder"

    def attention_attributes(self, attention):
        names = super().attention_attributes(attention) + ["query_proj", "key_proj", "value_proj", "share_att_key"]
        if getattr(attention, "relative_attention", False):
            kinds = getattr(attention, "pos_att_type", [])
            names.append("pos_ebd_size")
            if not getattr(attention, "share_att_key", False):
                names += ["pos_key_proj"] * ("c2p" in kinds) + ["pos_query_proj"] * ("p2c" in kinds)
        return names

    def check_config(self, config) -> None:
        super().check_config(config)
        head_dim = config.hidden_size // config.num_attention_heads
        if getattr(config, "attention_head_size", head_dim) != head_dim:
            raise ValueError(f"patch_model needs config.attention_head_size == hidden_size // num_attention_heads "
                             f"= {head_dim} (the prefix's head size); got {config.attention_head_size}")

    def project(self, module, hidden_states):
        heads = module.num_attention_heads
        return tuple(module.transpose_for_scores(projection(hidden_states), heads).unflatten(0, (-1, heads))
                     for projection in (module.query_proj, module.key_proj, module.value_proj))

    def relative_rows(self, module, seq_len):
        return module.pos_ebd_size, slice(0, 2 * module.pos_ebd_size)

    def packed_conv(self, base_model):
        return getattr(base_model.encoder, "conv", None)

    def relative_projections(self, module):
        kinds = module.pos_att_type
        keys, queries = ((module.key_proj, module.query_proj) if module.share_att_key
                         else (getattr(module, "pos_key_proj", None), getattr(module, "pos_query_proj", None)))
        return (keys if "c2p" in kinds else None), (queries if "p2c" in kinds else None)


DEBERTA = _DebertaV1()
DEBERTA_V2 = _DebertaV2()
