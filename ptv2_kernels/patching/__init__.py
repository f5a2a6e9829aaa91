"""``patch_model`` / ``unpatch_model``: turn a transformers encoder (any task head) into a P-Tuning v2
model whose self-attention reads the prefix through :func:`ptv2_kernels.prefix_attention`.

Families are looked up by the class of ``model.base_model``: BERT, RoBERTa (``bert.py``), DeBERTa and
DeBERTa-v2/v3 (``deberta.py``). A new family implements :class:`~ptv2_kernels.patching.base.ModelFamily` in its
own module and is added to ``FAMILIES``.
Only module instances are changed (instance ``forward`` attributes, hooks, one submodule), never classes,
so other models in the process are unaffected.
"""

from typing import Iterable, Optional

import transformers
from torch import nn

from ..ops.prefix_attention import BACKENDS
from ..prefix_encoder import PrefixConfig, PrefixEncoder
from .base import (ENCODER_ATTR, STATE_ATTR, ModelFamily, PatchState, clear_task_ids_hook, start_call_hook,
                   take_task_ids_hook)
from .bert import BERT, ROBERTA
from .deberta import DEBERTA, DEBERTA_V2

FAMILIES: list = [BERT, ROBERTA, DEBERTA, DEBERTA_V2]
MIN_TRANSFORMERS_MAJOR = 5


def _family_of(model: nn.Module) -> ModelFamily:
    base = getattr(model, "base_model", None)
    for family in FAMILIES:
        if isinstance(base, family.base_model_classes()):
            return family
    supported = ", ".join(cls.__name__ for family in FAMILIES for cls in family.base_model_classes())
    raise TypeError(f"patch_model supports transformers models built on {supported} (any task head); got "
                    f"{type(model).__name__} (base model {type(base).__name__})")


def _check_transformers_version() -> None:
    major = int(transformers.__version__.split(".")[0])
    if major < MIN_TRANSFORMERS_MAJOR:
        raise RuntimeError(f"patch_model needs transformers >= {MIN_TRANSFORMERS_MAJOR}.0 (its attention modules "
                           f"and keyword plumbing), found transformers {transformers.__version__}")


def _resolve_layers(layers: Optional[Iterable[int]], num_layers: int) -> tuple:
    """Prompt depth: sorted distinct layer indices (negative ones count from the end)."""
    if layers is None:
        return tuple(range(num_layers))
    try:
        indices = [int(i) for i in layers]
    except TypeError:
        raise TypeError(f"layers must be None or an iterable of layer indices, got {layers!r}") from None
    if not all(-num_layers <= i < num_layers for i in indices):
        raise ValueError(f"layers must be indices in [-{num_layers}, {num_layers}) for a {num_layers}-layer model, "
                         f"got {indices}")
    resolved = sorted({i % num_layers for i in indices})
    if not resolved or len(resolved) != len(indices):
        raise ValueError(f"layers must be a non-empty list of distinct layer indices, got {indices}")
    return tuple(resolved)


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

    Returns the attached encoder. Patching a patched model raises RuntimeError: unpatch it first.
    """
    _check_transformers_version()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    family = _family_of(model)
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already patched; call unpatch_model(model) before patching again")
    if hasattr(model, ENCODER_ATTR):
        raise RuntimeError(f"{type(model).__name__} already has an attribute {ENCODER_ATTR!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    config = model.config
    family.check_config(config)
    base = model.base_model
    attentions = family.self_attention_modules(base)
    heads = config.num_attention_heads
    prefix_config = PrefixConfig(
        prefix_len=prefix_len,
        num_heads=heads,
        head_dim=config.hidden_size // heads,
        num_hidden_layers=len(attentions),
        layers=_resolve_layers(layers, len(attentions)),
        num_tasks=num_tasks,
        prefix_projection=bool(prefix_projection),
        prefix_hidden_size=prefix_hidden_size,
        prefix_dropout=config.hidden_dropout_prob if prefix_dropout is None else prefix_dropout,
        model_type=config.model_type,
    )
    device = next(model.parameters()).device
    encoder = PrefixEncoder(prefix_config).to(device).train(model.training)

    state = PatchState(encoder=encoder, backend=backend, modules=[], handles=[])
    if freeze_backbone:
        state.requires_grad = [(p, p.requires_grad) for p in base.parameters()]
        for parameter in base.parameters():
            parameter.requires_grad_(False)
    state.handles += family.input_hooks(base, prefix_len)
    state.handles.append(model.register_forward_pre_hook(take_task_ids_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(clear_task_ids_hook(state), with_kwargs=True, always_call=True))
    state.handles.append(base.register_forward_pre_hook(start_call_hook(state), with_kwargs=True))
    for slot, layer in enumerate(prefix_config.layers):
        module = attentions[layer]
        module.forward = family.patched_forward(module, slot)
        state.modules.append(module)
    model.add_module(ENCODER_ATTR, encoder)
    setattr(model, STATE_ATTR, state)
    return encoder


def unpatch_model(model: nn.Module) -> PrefixEncoder:
    """Undo :func:`patch_model` exactly: original attention, positions, ``requires_grad`` flags, no
    ``model.prefix_encoder``. Returns the detached encoder (its weights are kept)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched (patch_model was not called on it)")
    for handle in state.handles:
        handle.remove()
    for module in state.modules:
        del module.forward
    for parameter, requires_grad in state.requires_grad:
        parameter.requires_grad_(requires_grad)
    delattr(model, ENCODER_ATTR)
    delattr(model, STATE_ATTR)
    return state.encoder


__all__ = ["patch_model", "unpatch_model", "FAMILIES", "ModelFamily"]
