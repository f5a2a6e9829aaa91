"""``patch_model`` / ``unpatch_model``: turn a transformers encoder (any task head) into a P-Tuning v2
model whose self-attention reads the prefix through :func:`ptv2_kernels.prefix_attention`; ``load_prefix``
of a saved prefix into a model.

Families are looked up by ``config.model_type`` in the one table of them, ``registry.FAMILIES``: BERT, RoBERTa
(``bert.py``), XLM-RoBERTa and CamemBERT (``xlm_roberta.py``), ELECTRA (``electra.py``), DeBERTa and
DeBERTa-v2/v3 (``deberta.py``). A new family implements :class:`~ptv2_kernels.patching.base.ModelFamily` in its
own module and is added to that table; the patch state keeps the family, and packed serving, the serving heads,
the adapters and the bench ask it.
Only module instances are changed (hooks, one config object or instance ``forward`` per patched self-attention
module, one submodule), never classes, so other models in the process are unaffected. Every argument, the
transformers version (:mod:`~ptv2_kernels.patching.compat`) and the model's layout are checked before anything
is changed: a failed ``patch_model`` leaves the model as it was.
"""

import operator
from numbers import Real
from typing import Iterable, Optional

from torch import nn

from ..errors import CheckpointError
from ..ops.prefix_attention import BACKENDS, check_backend
from ..prefix_encoder import PrefixConfig, PrefixEncoder, read_prefix_file
from . import compat
from .base import (ENCODER_ATTR, STATE_ATTR, ModelFamily, PatchState, check_attended_hook, clear_task_ids_hook,
                   start_call_hook, take_task_ids_hook)
from .registry import FAMILIES, family_named, family_of


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got the bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _backend(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {value!r} ({type(value).__name__})")
    return check_backend(value)


def _dropout(value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"prefix_dropout must be None or a float in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"prefix_dropout must be None or a float in [0, 1), got {value!r}")
    return float(value)


def _resolve_layers(layers: Optional[Iterable[int]], num_layers: int) -> tuple:
    """Prompt depth: sorted distinct layer indices (negative ones count from the end)."""
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be None or an iterable of int layer indices, got {layers!r}")
    indices = list(layers)
    for i in indices:
        if isinstance(i, bool) or not hasattr(type(i), "__index__"):
            raise TypeError(f"layers must hold int layer indices, got {i!r} ({type(i).__name__}) in {indices!r}")
    indices = [operator.index(i) for i in indices]
    if not all(-num_layers <= i < num_layers for i in indices):
        raise ValueError(f"layers must be indices in [-{num_layers}, {num_layers}) for a {num_layers}-layer model, "
                         f"got {indices}")
    resolved = sorted({i % num_layers for i in indices})
    if not resolved or len(resolved) != len(indices):
        raise ValueError(f"layers must be a non-empty list of distinct layer indices, got {indices}")
    return tuple(resolved)


def _prefix_config(model: nn.Module, prefix_len, *, prefix_projection, prefix_hidden_size,
                   prefix_dropout, layers, num_tasks) -> PrefixConfig:
    """The checked :class:`PrefixConfig` that ``patch_model(model, ...)`` attaches."""
    config = model.config
    num_layers = len(model.base_model.encoder.layer)
    heads = config.num_attention_heads
    return PrefixConfig(
        prefix_len=_positive_int("prefix_len", prefix_len),
        num_heads=heads,
        head_dim=config.hidden_size // heads,
        num_hidden_layers=num_layers,
        layers=_resolve_layers(layers, num_layers),
        num_tasks=_positive_int("num_tasks", num_tasks),
        prefix_projection=_flag("prefix_projection", prefix_projection),
        prefix_hidden_size=_positive_int("prefix_hidden_size", prefix_hidden_size),
        prefix_dropout=_dropout(prefix_dropout, config.hidden_dropout_prob),
        model_type=config.model_type,
    )


def _checked_model(model) -> ModelFamily:
    """The family of an unpatched, supported ``model`` whose layout this transformers version matches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    compat.check_version()
    family = family_of(model)
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already patched; call unpatch_model(model) before patching "
                           "again")
    if hasattr(model, ENCODER_ATTR):
        raise RuntimeError(f"{type(model).__name__} already has an attribute {ENCODER_ATTR!r}")
    family.check_layout(model.base_model)
    family.check_config(model.config)
    return family


def patch_model(
    model: nn.Module,
    prefix_len: int,
    *,
    prefix_projection: bool = False,
    prefix_hidden_size: int = 512,
    prefix_dropout: Optional[float] = None,
    layers: Optional[Iterable[int]] = None,
    num_tasks: int = 1,
    freeze_backbone: bool = True,
    backend: str = "auto",
) -> PrefixEncoder:
    """Attach a :class:`PrefixEncoder` to ``model`` (as ``model.prefix_encoder``) and route the
    self-attention of the chosen layers through ``prefix_attention``, in train and eval mode.

    Args:
        model: a transformers BERT, RoBERTa, DeBERTa or DeBERTa-v2/v3 model, bare or with any task head, encoder
            configuration.
        prefix_len: P, the number of prefix positions per layer; absolute positions of the tokens shift by P
            (DeBERTa's relative positions do not).
        prefix_projection, prefix_hidden_size: the reparameterization MLP (SPEC §2).
        prefix_dropout: per-row dropout on the prefix K/V in training; None = ``config.hidden_dropout_prob``.
        layers: prompt depth, the layer indices that get a prefix; None = every layer.
        num_tasks: T > 1 makes the prefix a bank; then call ``model(..., task_ids=<[B] int64>)``.
        freeze_backbone: freeze the base model's parameters (the task head and the prefix stay trainable).
        backend: the ``prefix_attention`` backend.

    Returns the attached encoder. Raises TypeError/ValueError naming a bad argument, RuntimeError for a patched
    model or a transformers version/layout it does not recognise; then the model is unchanged.
    """
    family = _checked_model(model)
    _flag("freeze_backbone", freeze_backbone)
    prefix_config = _prefix_config(model, prefix_len, prefix_projection=prefix_projection,
                                   prefix_hidden_size=prefix_hidden_size, prefix_dropout=prefix_dropout,
                                   layers=layers, num_tasks=num_tasks)
    return _attach(model, family, prefix_config, freeze_backbone, _backend(backend))


def _attach(model: nn.Module, family: ModelFamily, prefix_config: PrefixConfig, freeze_backbone: bool,
            backend: str) -> PrefixEncoder:
    """Patch a checked ``model`` with a new encoder of ``prefix_config`` (nothing here raises on valid input)."""
    base = model.base_model
    attentions = family.self_attention_modules(base)
    device = next(model.parameters()).device
    encoder = PrefixEncoder(prefix_config).to(device).train(model.training)
    state = PatchState(encoder=encoder, family=family, backend=backend, slots={}, handles=[])
    if freeze_backbone:
        state.requires_grad = [(p, p.requires_grad) for p in base.parameters()]
        for parameter in base.parameters():
            parameter.requires_grad_(False)
    state.handles += family.input_hooks(base, prefix_config.prefix_len)
    state.handles.append(model.register_forward_pre_hook(take_task_ids_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(clear_task_ids_hook(state), with_kwargs=True, always_call=True))
    state.handles.append(base.register_forward_pre_hook(start_call_hook(state), with_kwargs=True))
    state.handles.append(base.register_forward_hook(check_attended_hook(state), with_kwargs=True))
    for slot, layer in enumerate(prefix_config.layers):
        module = attentions[layer]
        state.handles.append(family.route_attention(module))
        state.slots[module] = slot
    model.add_module(ENCODER_ATTR, encoder)
    setattr(model, STATE_ATTR, state)
    return encoder


def unpatch_model(model: nn.Module) -> PrefixEncoder:
    """Undo :func:`patch_model` exactly: original attention, positions, ``requires_grad`` flags, no
    ``model.prefix_encoder``. Returns the detached encoder (its weights are kept)."""
    state = patch_state(model)
    for handle in reversed(state.handles):
        handle.remove()
    for parameter, requires_grad in state.requires_grad:
        parameter.requires_grad_(requires_grad)
    delattr(model, ENCODER_ATTR)
    delattr(model, STATE_ATTR)
    return state.encoder


def load_prefix(path, model: Optional[nn.Module] = None, *, backend: str = "auto",
                freeze_backbone: bool = True) -> PrefixEncoder:
    """Read a file written by :func:`~ptv2_kernels.save_prefix`.

    Without ``model``: returns a standalone :class:`PrefixEncoder`. With ``model``: patches it with the saved
    options (``patch_model(model, ..., backend=backend, freeze_backbone=freeze_backbone)``), loads the weights and
    returns the attached encoder. All or nothing: the file (readable, metadata, tensor names, shapes, dtypes) and its
    fit to the model (family, depth, layers, heads, head size) are checked first; on any error (``CheckpointError``
    naming the file for the file and the fit) the model is exactly as before.
    """
    _flag("freeze_backbone", freeze_backbone)
    _backend(backend)
    config, tensors = read_prefix_file(path)
    if model is None:
        encoder = PrefixEncoder(config)
        encoder.load_state_dict(tensors)
        return encoder
    family = _checked_model(model)
    try:
        fitted = _prefix_config(model, config.prefix_len, prefix_projection=config.prefix_projection,
                                prefix_hidden_size=config.prefix_hidden_size, prefix_dropout=config.prefix_dropout,
                                layers=list(config.layers), num_tasks=config.num_tasks)
    except ValueError as error:
        raise CheckpointError(f"{path} does not match {type(model).__name__}: {error}") from None
    mismatched = {name: (getattr(config, name), getattr(fitted, name))
                  for name in config.to_dict() if getattr(config, name) != getattr(fitted, name)}
    if mismatched:
        detail = ", ".join(f"{name} {saved!r} != {fit!r}" for name, (saved, fit) in mismatched.items())
        raise CheckpointError(f"{path} does not match {type(model).__name__} (saved != model): {detail}")
    encoder = _attach(model, family, fitted, freeze_backbone, backend)
    try:
        encoder.load_state_dict(tensors)
    except BaseException:
        unpatch_model(model)
        raise
    return encoder


def patch_state(model: nn.Module) -> PatchState:
    """The :class:`PatchState` of a model patched with :func:`patch_model` (its encoder, family, backend...);
    ValueError if it is not patched."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched (patch_model was not called on it)")
    return state


__all__ = ["patch_model", "unpatch_model", "load_prefix", "FAMILIES", "ModelFamily", "family_of", "family_named",
           "patch_state"]
