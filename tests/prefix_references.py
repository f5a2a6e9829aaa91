"""The outside references of the patched BERT/RoBERTa models, shared by the tests.

- transformers' own prefix semantics: an unpatched model run with a ``DynamicCache`` that holds the prefix as
  every layer's past keys/values and the attention mask widened by P ones (positions then shift by the cache
  length, exactly as transformers does it): :func:`dynamic_cache_outputs`. Independent of PEFT.
- PEFT prefix tuning itself (the tests call ``get_peft_model``; where the installed PEFT refuses BERT/RoBERTa,
  e.g. PEFT 0.21 on transformers >= 5.24, those tests fail with PEFT's error: the supported pairs are in the README).
"""

import inspect

import torch
from transformers import DynamicCache


def cache_argument(model) -> str:
    """The name the installed transformers gives the cache argument of ``model``'s base model forward."""
    parameters = inspect.signature(type(model.base_model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def enable_activation_checkpointing(model, checkpointing_kwargs=None) -> None:
    """transformers' activation checkpointing under its name on the installed version:
    ``activation_checkpointing_enable`` where it exists (``gradient_checkpointing_enable`` is deprecated there, to
    be removed in v6), else ``gradient_checkpointing_enable`` (transformers before 5.23)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)


def prefix_cache(prefix: torch.Tensor, rows: int) -> DynamicCache:
    """A ``DynamicCache`` holding the compact prefix ``[L, 2, H, P, D]`` as every layer's past keys and values,
    expanded over ``rows`` (differentiable in ``prefix``). A forward appends to it: use a fresh one per call."""
    assert prefix.dim() == 5, f"a compact prefix [L, 2, H, P, D], got shape {list(prefix.shape)}"
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(prefix.unbind(0)):
        cache.update(keys.expand(rows, *keys.shape), values.expand(rows, *values.shape), layer)
    return cache


def dynamic_cache_outputs(model, prefix: torch.Tensor, **inputs):
    """transformers' own prefix semantics: the unpatched ``model`` called with ``inputs`` (``input_ids`` or
    ``inputs_embeds``, optional ``attention_mask`` of shape ``[..., N]``, ``position_ids``, ...), a
    ``DynamicCache`` of ``prefix`` (full depth) and the mask widened by P ones. Multiple-choice inputs
    ``[B, C, N]`` are flattened by the head, so the cache has ``B·C`` rows."""
    source = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"][..., 0]
    rows = source.reshape(-1, source.shape[-1]).shape[0]
    prefix_len = prefix.shape[-2]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(source.shape, dtype=torch.long)
    ones = torch.ones(*mask.shape[:-1], prefix_len, dtype=mask.dtype)
    inputs = {**inputs, "attention_mask": torch.cat([ones, mask], dim=-1)}
    return model(**inputs, **{cache_argument(model): prefix_cache(prefix, rows)})
