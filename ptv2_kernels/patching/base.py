"""What every model family shares when it is patched: the per-forward :class:`PrefixCall`, the hooks that
build it, backbone freezing, and the :class:`ModelFamily` interface a family module implements.

How one forward of a patched model runs:
1. a pre-hook on the patched (top-level) model pops ``task_ids`` and repeats them over multiple-choice
   choices (their rows are flattened by the head);
2. a pre-hook on the family's base model (``BertModel``, ...) evaluates the :class:`PrefixEncoder` once,
   takes the 2D padding mask, checks ``task_ids``, and passes a :class:`PrefixCall` down as the keyword
   argument ``ptv2_prefix_call``, which transformers 5 forwards through every layer to the self-attention
   modules (so gradient checkpointing recomputes with the same call);
3. each patched self-attention module attends over its prefix row with :func:`ptv2_kernels.prefix_attention`
   (:meth:`PrefixCall.attend`): BERT/RoBERTa through the registered ``AttentionInterface`` function, DeBERTa
   through an instance ``forward`` (classes are never changed);
4. a post-hook on the base model checks that every patched layer did attend (else the installed transformers
   routed attention past the patch: ``RuntimeError`` instead of outputs without the prefix).
"""

import abc
import functools
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..ops import prefix_attention as op_module
from ..ops.prefix_attention import prefix_attention, prefix_attention_checked_once
from ..ops.validation import check_task_id_values
from ..prefix_encoder import PrefixEncoder
from . import compat
from .positions import Positions

CALL_KWARG = "ptv2_prefix_call"
ENCODER_ATTR = "prefix_encoder"
STATE_ATTR = "_ptv2_patch_state"


@dataclass(frozen=True)
class PrefixCall:
    """What the patched layers of one model forward read.

    ``prefix``: the compact prefix ``[L', 2, H, P, D]`` or bank ``[T, L', 2, H, P, D]`` (evaluated once);
    ``key_padding_mask``: ``[B, N]`` bool, True = real token (None: no padding); ``task_ids``: ``[B]``
    int64 with a bank; ``prefix_dropout_p``: 0 in eval; ``slots``: the patched self-attention modules and
    their prefix row; ``attended``: the rows that attended in this forward (checked after it); ``checked``:
    the first layer's checked arguments (:func:`~ptv2_kernels.ops.prefix_attention.prefix_attention_checked_once`).
    """

    prefix: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    task_ids: Optional[torch.Tensor]
    prefix_dropout_p: float
    backend: str
    slots: dict
    attended: set = field(default_factory=set)
    checked: dict = field(default_factory=dict)  # what prefix_attention_checked_once keeps for this forward

    def attend(self, module: nn.Module, q, k, v, **op_kwargs) -> torch.Tensor:
        """``prefix_attention`` of ``q, k, v`` (``[B, H, N, D]``) over the prefix row of ``module``, the prefix
        cast to q's dtype. ``op_kwargs``: ``scale``, ``dropout_p``, ``disentangled_bias``."""
        slot = self.slots.get(module)
        if slot is None:
            raise RuntimeError(f"a {type(module).__name__} that patch_model did not patch was routed to the prefix "
                               "attention (was its attention implementation set by hand?)")
        self.attended.add(slot)
        layer = self.prefix[slot] if self.task_ids is None else self.prefix[:, slot]
        layer = layer.to(q.dtype)
        arguments = dict(key_padding_mask=self.key_padding_mask, task_ids=self.task_ids,
                         prefix_dropout_p=self.prefix_dropout_p, backend=self.backend, **op_kwargs)
        prefix_k, prefix_v = layer.select(-4, 0), layer.select(-4, 1)
        if prefix_attention is not op_module.prefix_attention:  # a test or benchmark swapped in a baseline
            return prefix_attention(q, k, v, prefix_k, prefix_v, **arguments)
        return prefix_attention_checked_once(self.checked, q, k, v, prefix_k, prefix_v, **arguments)


def take_call(kwargs: dict) -> PrefixCall:
    """Pop the :class:`PrefixCall` a patched attention module was given; RuntimeError if it is missing."""
    call = kwargs.pop(CALL_KWARG, None)
    if call is None:
        raise RuntimeError("a patched self-attention module was called outside a forward of its patched model "
                           f"(no {CALL_KWARG!r} argument); call the model, or unpatch_model it first")
    return call


# How a family's sequence-classification head reads a sequence (serving's heads, reference checkpoints' heads):
BASE_POOLER = "base-pooler"  # BERT: the base model's pooler (first token), then ``classifier``
FIRST_TOKEN = "first-token"  # RoBERTa, ELECTRA: ``classifier`` reads the first token itself (``dense``, ``out_proj``)
CONTEXT_POOLER = "context-pooler"  # DeBERTa: the head's ``pooler`` (first token), then ``classifier``


class ModelFamily(abc.ABC):
    """Everything the package knows about one transformers model family, in one object: the registry
    (:mod:`~ptv2_kernels.patching.registry`) maps ``config.model_type`` (:attr:`name`) to it, ``patch_model`` keeps
    it on the patch state, and packed serving, the serving heads, the adapters and the bench ask it.

    - layout: the transformers module, base model, embeddings and self-attention classes;
      :meth:`check_layout` (before anything is changed) raises
      :class:`~ptv2_kernels.patching.compat.LayoutError` for every name the family relies on that is missing or
      different; :meth:`check_config` refuses configurations it cannot patch;
    - routing: :meth:`route_attention` makes a self-attention module attend over the forward's prefix;
    - positions: :meth:`positions`, absolute positions shifted by P (padded and packed, one numbering);
    - attention as packed serving computes it: :meth:`project`, :meth:`score_scale`, :meth:`relative_terms`;
    - what else serving and adapters need: :attr:`serves_packed`, :attr:`sequence_head`,
      :attr:`peft_format_covers` (whether PEFT's adapter files can hold the prefix; whether PEFT itself runs the
      model is found by trying it), :attr:`reference_backbone`.
    """

    name: str  # config.model_type
    module_path: str
    base_class: str
    attention_class: str
    embeddings_class: str
    positions_after_padding_idx = False  # RoBERTa's numbering (see positions.py)
    disentangled = False  # DeBERTa's relative terms (c2p/p2c) reach the kernel
    serves_packed = True  # packed_forward serves it
    sequence_head = FIRST_TOKEN
    peft_format_covers = True
    reference_backbone: Optional[str] = None  # where the P-Tuning v2 reference's model holds the backbone

    def _module(self):
        return importlib.import_module(self.module_path)

    def base_model_classes(self) -> tuple:
        """The base model classes (``BertModel``, ...) this family patches, any task head around them."""
        cls = getattr(self._module(), self.base_class, None)
        return (cls,) if isinstance(cls, type) else ()

    def self_attention_modules(self, base_model: nn.Module) -> list:
        """One self-attention module per layer, in layer order (the layout is checked by ``check_layout``)."""
        return [layer.attention.self for layer in base_model.encoder.layer]

    def check_layout(self, base_model: nn.Module) -> None:
        """The shared layout: the base model is exactly the family's class, ``encoder.layer`` a ModuleList of
        layers whose ``attention.self`` is exactly the family's self-attention class. Families extend it with what
        their patch reads."""
        module = self._module()
        compat.require_instance(base_model, compat.require_module_class(module, self.base_class, "base model"),
                                "the base model")
        where = f"{self.base_class}.encoder.layer"
        layers = getattr(getattr(base_model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise compat.LayoutError(f"{where} is not a non-empty ModuleList")
        attention_class = compat.require_module_class(module, self.attention_class, "self-attention")
        for index, layer in enumerate(layers):
            attention = getattr(getattr(layer, "attention", None), "self", None)
            compat.require_instance(attention, attention_class, f"{where}[{index}].attention.self")

    def check_config(self, config) -> None:
        """Raise ValueError for configurations the family cannot patch."""

    @abc.abstractmethod
    def route_attention(self, module: nn.Module):
        """Make ``module`` attend through the forward's :class:`PrefixCall` (``call.attend(module, ...)``);
        returns a handle whose ``remove()`` undoes it exactly."""

    def positions(self, base_model: nn.Module, prefix_len: int) -> Optional[Positions]:
        """The model's absolute positions shifted by ``prefix_len`` (None: it has none, e.g. DeBERTa with
        ``position_biased_input=False``)."""
        embeddings = base_model.embeddings
        table = getattr(embeddings, "position_embeddings", None)
        if table is None:
            return None
        padding_idx = embeddings.padding_idx if self.positions_after_padding_idx else None
        first = 0 if padding_idx is None else padding_idx + 1
        return Positions(prefix_len, first, table.num_embeddings, padding_idx)

    def max_length(self, base_model: nn.Module, prefix_len: int) -> int:
        """The longest input a patched model takes (the shifted positions fit, or ``max_position_embeddings``)."""
        positions = self.positions(base_model, prefix_len)
        return base_model.config.max_position_embeddings if positions is None else positions.max_length

    def input_hooks(self, base_model: nn.Module, prefix_len: int) -> list:
        """Hooks (removable handles) that adapt the model's inputs to a prefix: the embeddings get their
        positions shifted by P (when no ``position_ids`` are given)."""
        positions = self.positions(base_model, prefix_len)
        if positions is None:
            return []
        return [base_model.embeddings.register_forward_pre_hook(functools.partial(_shift_positions, positions),
                                                                 with_kwargs=True)]

    def embed(self, base_model: nn.Module, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        """The hidden states the encoder's first layer reads (packed serving calls the model's own embeddings)."""
        return base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)

    @abc.abstractmethod
    def project(self, module: nn.Module, hidden_states: torch.Tensor) -> tuple:
        """``q, k, v`` ``[B, H, N, D]`` of one self-attention module, biases included (strided views allowed)."""

    @abc.abstractmethod
    def score_scale(self, module: nn.Module, head_dim: int) -> float:
        """The factor of the scores ``q·k`` of one self-attention module."""

    def relative_terms(self, base_model: nn.Module, seq_len: int, probe: torch.Tensor):
        """Relative-position terms for sequences of at most ``seq_len`` tokens: an object whose ``of(module,
        dtype)`` gives a layer's ``disentangled_bias`` (``probe``: a tensor on the model's device); None if the
        family has none."""
        return None

    def check_packed(self, base_model: nn.Module) -> None:
        """ValueError if this model cannot serve packed rows."""
        if not self.serves_packed:
            raise ValueError(f"packed inference does not support {self.name} models")

    def packed_conv(self, base_model: nn.Module) -> Optional[nn.Module]:
        """A convolution the encoder applies after its first layer (DeBERTa-v2's ``ConvLayer``), or None."""
        return None


def _shift_positions(positions: Positions, embeddings, args, kwargs):
    """Embeddings pre-hook: when no ``position_ids`` are given, pass them (the public argument) shifted by P."""
    bound = bound_arguments(embeddings, args, kwargs)
    arguments = bound.arguments
    if arguments.get("position_ids") is not None:
        return None
    input_ids = arguments.get("input_ids")
    source = input_ids if input_ids is not None else arguments["inputs_embeds"]
    arguments["position_ids"] = positions.padded(input_ids, tuple(source.shape[:2]), source.device)
    return bound.args, bound.kwargs


@dataclass
class PatchState:
    """Everything ``unpatch_model`` undoes. ``slots``: each patched self-attention module and its prefix row;
    ``handles``: hooks and routings (``remove()``). ``pending_task_ids``: set by the top-level pre-hook,
    consumed by the base-model pre-hook within the same forward."""

    encoder: PrefixEncoder
    family: ModelFamily
    backend: str
    slots: dict
    handles: list
    requires_grad: list = field(default_factory=list)
    pending_task_ids: Optional[torch.Tensor] = None


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """``module.forward``'s arguments by name (edit ``.arguments``, then call with ``.args, .kwargs``). Read
    from the class's ``forward`` (less ``self``): a patched DeBERTa base model's instance ``forward`` is a
    wrapper with the same signature, which dynamo's ``inspect.signature`` does not follow."""
    forward = type(module).forward
    # eager: the signature once per class (building it costs ~20 µs per hook call); traced: dynamo's own
    signature = _forward_signature(forward) if torch.compiler.is_compiling() else _cached_signature(forward)
    return signature.bind_partial(*args, **kwargs)


def _forward_signature(forward) -> inspect.Signature:
    signature = inspect.signature(forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


_cached_signature = functools.lru_cache(maxsize=None)(_forward_signature)


def _examples(bound: inspect.BoundArguments) -> tuple:
    """The example dimensions of the call: ``[B]``, or ``[B, C]`` for multiple choice."""
    input_ids, embeds = bound.arguments.get("input_ids"), bound.arguments.get("inputs_embeds")
    if input_ids is not None:
        return tuple(input_ids.shape[:-1])
    if embeds is not None:
        return tuple(embeds.shape[:-2])
    raise ValueError("the patched model needs input_ids or inputs_embeds")


# The hooks are partials of module-level functions, not closures, so that ``copy.deepcopy`` of a patched
# model gives hooks bound to the copy's own PatchState.


def take_task_ids_hook(state: PatchState):
    """Top-level pre-hook: pop ``task_ids`` (``[B]``, one per example) and repeat it over the flattened rows
    of each example (the choices of a multiple-choice head)."""
    return functools.partial(_take_task_ids, state)


def _take_task_ids(state: PatchState, model, args, kwargs):
    task_ids = kwargs.pop("task_ids", None)
    if task_ids is not None:
        if not isinstance(task_ids, torch.Tensor):
            raise TypeError(f"task_ids must be a [B] int64 tensor, got {type(task_ids).__name__}")
        examples = _examples(bound_arguments(model, args, kwargs))
        if tuple(task_ids.shape) != examples[:1]:
            raise ValueError(f"task_ids must have one entry per example, shape {list(examples[:1])}, "
                             f"got {list(task_ids.shape)}")
        task_ids = task_ids.repeat_interleave(math.prod(examples[1:]))
    state.pending_task_ids = task_ids
    return args, kwargs


def clear_task_ids_hook(state: PatchState):
    """Top-level post-hook (runs even when the forward raised): forget this forward's ``task_ids``."""
    return functools.partial(_clear_task_ids, state)


def _clear_task_ids(state: PatchState, model, args, kwargs, output):
    state.pending_task_ids = None


def _check_task_ids(task_ids: Optional[torch.Tensor], num_tasks: int, batch: int) -> Optional[torch.Tensor]:
    if num_tasks == 1:
        if task_ids is not None:
            raise ValueError("task_ids was given but the model was patched with num_tasks=1 (no prefix bank)")
        return None
    if task_ids is None:
        raise ValueError(f"task_ids is required: the model was patched with num_tasks={num_tasks}; call "
                         "model(..., task_ids=<[B] int64 tensor>)")
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if tuple(task_ids.shape) != (batch,):
        raise ValueError(f"task_ids must be [B] = [{batch}], got shape {list(task_ids.shape)}")
    # once per forward on the host, even for CUDA tensors (the layers' own checks are sync-free); a device
    # assertion under torch.compile
    check_task_id_values(task_ids, num_tasks, sync_free=False)
    return task_ids.long()


CACHE_ARGUMENTS = ("past_key_values", "cache")  # transformers < 5.24 / >= 5.24 name of the cache argument


def start_call_hook(state: PatchState):
    """Base-model pre-hook: build this forward's :class:`PrefixCall` and pass it down as a keyword."""
    return functools.partial(_start_call, state)


def _sequence_length(bound: inspect.BoundArguments) -> int:
    input_ids = bound.arguments.get("input_ids")
    return input_ids.shape[-1] if input_ids is not None else bound.arguments["inputs_embeds"].shape[-2]


def _start_call(state: PatchState, base_model, args, kwargs):
    bound = bound_arguments(base_model, args, kwargs)
    for name in CACHE_ARGUMENTS:
        if bound.arguments.get(name) is not None or bound.kwargs.get(name) is not None:
            raise ValueError(f"a patched model reads its prefix from the PrefixEncoder; {name} must be None")
    examples = _examples(bound)
    mask = bound.arguments.get("attention_mask")
    if mask is not None:
        expected = [examples[0], _sequence_length(bound)]
        if not isinstance(mask, torch.Tensor) or list(mask.shape) != expected:
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask of a patched model must be a 2D [B, N] = {expected} padding mask "
                             f"(1 = real token), got {got}")
        mask = mask.bool()
    task_ids = kwargs.pop("task_ids", None)
    task_ids = state.pending_task_ids if task_ids is None else task_ids
    encoder = state.encoder
    kwargs[CALL_KWARG] = PrefixCall(
        prefix=encoder(),
        key_padding_mask=mask,
        task_ids=_check_task_ids(task_ids, encoder.config.num_tasks, examples[0]),
        prefix_dropout_p=encoder.config.prefix_dropout if encoder.training else 0.0,
        backend=state.backend,
        slots=state.slots,
    )
    return args, kwargs


def check_attended_hook(state: PatchState):
    """Base-model post-hook: every patched layer attended through the prefix in this forward. Else the installed
    transformers routes attention past the patch (the prefix was silently left out): raise instead of returning."""
    return functools.partial(_check_attended, state)


def _check_attended(state: PatchState, base_model, args, kwargs, output):
    call = kwargs.get(CALL_KWARG)
    missing = sorted(set(state.slots.values()) - call.attended) if call is not None else []
    if missing:
        layers = state.encoder.config.layers
        raise compat.LayoutError(f"the self-attention of layer(s) {[layers[slot] for slot in missing]} of "
                                 f"{type(base_model).__name__} did not run through the patched attention")
