"""The outside references of the patched BERT/RoBERTa models, shared by the tests.

- transformers' own prefix semantics: an unpatched model run with a ``DynamicCache`` that holds the prefix as
  every layer's past keys/values and the attention mask widened by P ones (positions then shift by the cache
  length, exactly as transformers does it): :func:`dynamic_cache_outputs`. Independent of PEFT.
- PEFT 0.21 prefix tuning. PEFT finds the prefix-capable forward by looking for a ``past_key_values`` parameter;
  transformers 5.24 renamed it ``cache`` in ``BertModel``/``RobertaModel.forward`` (the old keyword is still
  accepted until 5.40, but not in the signature), so PEFT refuses them. :func:`install_peft_backbone_shim`
  (called once by ``conftest.py`` for the whole test session, tests only) gives those classes' forward the old
  name back, forwarding it to ``cache``, where the installed transformers lacks it.
"""

import functools
import inspect

import torch
from transformers import DynamicCache

from ptv2_kernels.patching import FAMILIES

# the base models of the families whose prefix PEFT's adapter format holds (BERT, RoBERTa, XLM-RoBERTa, ...)
PEFT_BACKBONES = tuple(cls for family in FAMILIES.values() if family.peft_format_covers
                       for cls in family.base_model_classes())
_SHIMMED = "__ptv2_test_shim_of__"


def _shimmed_forward(forward):
    """``forward`` with a keyword ``past_key_values`` passed on as ``cache`` (signature: the original's plus it)."""
    signature = inspect.signature(forward)
    parameters = list(signature.parameters.values())
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    parameters.insert(next(i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), extra)

    @functools.wraps(forward)
    def shimmed(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(self, *args, **kwargs)

    shimmed.__signature__ = signature.replace(parameters=parameters)
    setattr(shimmed, _SHIMMED, forward)
    return shimmed


def install_peft_backbone_shim() -> list:
    """Give :data:`PEFT_BACKBONES`' ``forward`` a ``past_key_values`` parameter where it has ``cache`` instead
    (idempotent). Returns the classes it shimmed."""
    shimmed = []
    for cls in PEFT_BACKBONES:
        parameters = inspect.signature(cls.forward).parameters
        if "past_key_values" not in parameters and "cache" in parameters:
            cls.forward = _shimmed_forward(cls.forward)
            shimmed.append(cls)
    return shimmed


def original_forward(cls):
    """``cls.forward`` without the shim (to simulate the transformers PEFT refuses)."""
    return getattr(cls.forward, _SHIMMED, cls.forward)


def cache_argument(model) -> str:
    """The name the installed transformers gives the cache argument of ``model``'s base model forward."""
    parameters = inspect.signature(original_forward(type(model.base_model))).parameters
    return "cache" if "cache" in parameters else "past_key_values"


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
