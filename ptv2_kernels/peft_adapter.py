"""PEFT prefix-tuning adapters for patched models of the families PEFT's format covers
(``ModelFamily.peft_format_covers``: BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA): the directory
``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads, without PEFT installed.

Files (what PEFT writes for a ``PrefixTuningConfig``, byte for byte, for every PEFT the tests run: ``peft>=0.21``):
- ``adapter_config.json``: the config's fields, sorted, indented by 2 (``peft_type`` ``PREFIX_TUNING``,
  ``task_type``, ``num_virtual_tokens`` P, ``num_layers`` L, ``num_attention_heads`` H, ``token_dim`` hidden, ...,
  ``peft_version`` and ``modules_to_save`` as the installed PEFT writes them (they differ between releases;
  :func:`~ptv2_kernels.peft_support.peft_written_fields` asks PEFT), or, where PEFT is not installed or refuses
  BERT, those of the stated format :data:`FORMAT_PEFT_VERSION`, which every tested PEFT loads);
- ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``): ``prompt_embeddings`` ``[P, 2·L·hidden]`` float32,
  the flat layout of :func:`~ptv2_kernels.prefix_encoder.prefix_to_flat` (PEFT stores a reparameterized prefix
  already evaluated), and for a task head the weights of PEFT's ``modules_to_save`` copy of it,
  ``base_model.<classifier | qa_outputs>.<name>``.
PEFT has no prompt depth and no bank: an adapter holds a prefix on every layer for one task.

No PEFT release tried prefix-tunes DeBERTa (PEFT raises "Model does not support past key values"; the README
states what each PEFT version runs, :mod:`ptv2_kernels.peft_support` finds it out), so no DeBERTa adapter exists:
use :func:`~ptv2_kernels.save_prefix`. Where the installed PEFT refuses BERT/RoBERTa (PEFT 0.21 on transformers
>= 5.24) the files stay valid: this module reads and writes them on every supported transformers.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .errors import CheckpointError
from .patching import FAMILIES, patch_model, unpatch_model
from .peft_support import peft_written_fields
from .patching.base import STATE_ATTR
from .prefix_encoder import PrefixEncoder, prefix_from_flat, prefix_to_flat

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the format written where PEFT is not installed (or refuses BERT): the files of the oldest PEFT the tests run (the
# floor of the test extra's peft range), which every tested PEFT loads (tests/test_peft_adapter.py)
FORMAT_PEFT_VERSION = "0.21.0"
PROMPT_KEY = "prompt_embeddings"
FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
# head class suffix -> (PEFT task type, the head module PEFT saves, modules_to_save in the FORMAT_PEFT_VERSION
# format: PEFT 0.21 adds its classifier names twice, by the PeftModel class and by its first adapter)
HEADS = {
    "ForSequenceClassification": ("SEQ_CLS", "classifier", ["classifier", "score"] * 2),
    "ForTokenClassification": ("TOKEN_CLS", "classifier", ["classifier", "score"] * 2),
    "ForQuestionAnswering": ("QUESTION_ANS", "qa_outputs", ["qa_outputs"] * 2),
}
TASK_TYPES = (FEATURE_EXTRACTION, *(task for task, _, _ in HEADS.values()))
_REQUIRED_FIELDS = {"peft_type": str, "num_virtual_tokens": int, "num_layers": int, "num_attention_heads": int,
                    "token_dim": int}


@dataclass
class PeftAdapter:
    """One adapter as read: the compact ``prefix`` ``[L, 2, H, P, D]`` (float32), the ``head`` weights (state
    dict of the head module, or None) and its PEFT ``task_type`` (None if the file has none)."""

    prefix: torch.Tensor
    head: Optional[Dict[str, torch.Tensor]]
    task_type: Optional[str]


def check_model_type(model_type: str, source) -> None:
    """ValueError (with the reason) for a model type whose family PEFT's prefix-tuning adapter format does not cover
    (``ModelFamily.peft_format_covers``)."""
    family = FAMILIES.get(model_type)
    if family is None or not family.peft_format_covers:
        covered = tuple(name for name, f in FAMILIES.items() if f.peft_format_covers)
        reason = ("not a model family of ptv2_kernels" if family is None else "PEFT 0.21 prefix tuning needs a "
                  f"backbone forward with past_key_values, which {family.base_class}'s has not")
        raise ValueError(f"{source}: PEFT refuses {model_type!r} ({reason}), so PEFT adapters exist for {covered} "
                         "models only; use save_prefix / load_prefix")


def _mismatch(source, pairs: dict) -> None:
    """CheckpointError naming every ``name: (adapter, model)`` pair that differs."""
    different = {name: values for name, values in pairs.items() if values[0] != values[1]}
    if different:
        detail = ", ".join(f"{name} {found!r} != {wanted!r}" for name, (found, wanted) in different.items())
        raise CheckpointError(f"{source} does not match the model (adapter != model): {detail}")


def _read_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory} is not a PEFT adapter: cannot read {path} ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object (a PEFT config), got a JSON {type(config).__name__}")
    if config.get("peft_type") != "PREFIX_TUNING":
        raise CheckpointError(f"{directory} is a PEFT {config.get('peft_type')} adapter, not PREFIX_TUNING ({path})")
    wrong = [f"{name} ({kind.__name__})" for name, kind in _REQUIRED_FIELDS.items()
             if not isinstance(config.get(name), kind) or isinstance(config.get(name), bool)]
    if wrong:
        raise CheckpointError(f"{path} lacks valid fields: {', '.join(wrong)}")
    return config


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001  (safetensors raises its own types for a missing or corrupt file)
        raise CheckpointError(f"cannot read the state dict file {path}: {error}") from None


def read_adapter(directory, *, model_type: str, num_layers: int, num_heads: int, hidden_size: int,
                 prefix_len: Optional[int] = None, task_type: Optional[str] = None, head_name: Optional[str] = None,
                 head_shapes: Optional[Dict[str, tuple]] = None) -> PeftAdapter:
    """Read and check a PEFT prefix-tuning adapter directory against a model, loading nothing.

    The model: ``model_type``, ``num_layers``, ``num_heads``, ``hidden_size``; ``prefix_len`` P (None: any);
    ``task_type`` its PEFT task type (None or ``FEATURE_EXTRACTION``: no head); ``head_name`` the head module whose
    weights an adapter may carry and, if given, ``head_shapes`` ``{name: shape}`` they must have exactly. An adapter
    without a head (``FEATURE_EXTRACTION``) fits any model; one with a head needs the model's ``task_type``.
    ``CheckpointError`` naming the file for anything that does not fit.
    """
    directory = Path(directory)
    check_model_type(model_type, directory)
    config = _read_config(directory)
    found_task = config.get("task_type")
    if found_task not in (None, *TASK_TYPES):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: PEFT task_type {found_task!r} is not one of {TASK_TYPES}")
    pairs = {"num_layers": (config["num_layers"], num_layers), "num_attention_heads": (config["num_attention_heads"],
                                                                                        num_heads),
             "token_dim": (config["token_dim"], hidden_size),
             "num_transformer_submodules": (config.get("num_transformer_submodules", 1), 1)}
    if prefix_len is not None:
        pairs["num_virtual_tokens"] = (config["num_virtual_tokens"], prefix_len)
    if found_task not in (None, FEATURE_EXTRACTION):  # a head's weights need the same kind of head
        pairs["task_type"] = (found_task, task_type)
    _mismatch(directory, pairs)
    path = directory / ADAPTER_WEIGHTS
    weights = _read_weights(path)
    flat = weights.pop(PROMPT_KEY, None)
    width = 2 * num_layers * hidden_size
    if flat is None or not flat.dtype.is_floating_point or tuple(flat.shape) != (config["num_virtual_tokens"], width):
        got = "none" if flat is None else f"{flat.dtype} {list(flat.shape)}"
        raise CheckpointError(f"{path}: {PROMPT_KEY!r} must be a floating-point [num_virtual_tokens, 2·L·hidden] = "
                              f"{[config['num_virtual_tokens'], width]}, got {got}")
    prefix = f"base_model.{head_name}." if head_name else None
    head = {k[len(prefix):]: v for k, v in weights.items() if prefix and k.startswith(prefix)}
    unexpected = sorted(k for k in weights if not (prefix and k.startswith(prefix)))
    if unexpected:
        raise CheckpointError(f"{path} has keys this model cannot use: {unexpected}")
    if head and head_shapes is not None:
        shapes = {k: tuple(v.shape) for k, v in head.items()}
        if shapes != head_shapes:
            raise CheckpointError(f"{path}: the {head_name} weights {shapes} do not fit the model's {head_shapes}")
    compact = prefix_from_flat(flat.float(), num_layers, num_heads).contiguous()
    return PeftAdapter(compact, head or None, found_task)


def write_adapter(directory, prefix: torch.Tensor, *, task_type: str = FEATURE_EXTRACTION,
                  head: Optional[Dict[str, torch.Tensor]] = None, name_or_path: Optional[str] = None) -> None:
    """Write the compact ``prefix`` ``[L, 2, H, P, D]`` (every layer) and, for a ``task_type`` with a head, the head
    module's ``head`` state dict as the adapter directory PEFT writes (``PeftModel.from_pretrained`` loads it;
    inference mode, no reparameterization: the prefix as it is)."""
    from safetensors.torch import save_file

    layers, _, heads, prefix_len, head_dim = prefix.shape
    hidden = heads * head_dim
    head_module, modules_to_save = next(((module, saved) for task, module, saved in HEADS.values()
                                         if task == task_type), (None, None))
    if (head is None) != (head_module is None):
        raise ValueError(f"PEFT task_type {task_type!r} {'needs' if head is None else 'has no'} head weights")
    written = peft_written_fields(task_type) or {"peft_version": FORMAT_PEFT_VERSION,
                                                 "modules_to_save": modules_to_save}
    weights = {PROMPT_KEY: prefix_to_flat(prefix.detach().float())}
    weights.update({f"base_model.{head_module}.{k}": v.detach().float() for k, v in (head or {}).items()})
    config = {
        "auto_mapping": None, "base_model_name_or_path": name_or_path or None, "encoder_hidden_size": hidden,
        "inference_mode": True, "init_weights": None, "num_attention_heads": heads, "num_layers": layers,
        "num_transformer_submodules": 1, "num_virtual_tokens": prefix_len, "peft_type": "PREFIX_TUNING",
        "prefix_projection": False, "revision": None, "task_type": task_type, "token_dim": hidden, **written,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in weights.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def model_head(model: nn.Module) -> tuple:
    """``(PEFT task type, head module name or None)`` of a model: a bare base model is
    ``FEATURE_EXTRACTION``; TypeError for a head PEFT prefix tuning has no task type for."""
    if model is getattr(model, "base_model", None):
        return FEATURE_EXTRACTION, None
    for suffix, (task_type, module, _) in HEADS.items():
        if type(model).__name__.endswith(suffix) and isinstance(getattr(model, module, None), nn.Module):
            return task_type, module
    raise TypeError(f"PEFT prefix-tuning adapters cover bare models and {', '.join(HEADS)} heads; got "
                    f"{type(model).__name__}")


def export_peft_adapter(model_or_encoder, directory) -> None:
    """Write the prefix of a patched model of a family PEFT's format covers (with its task head's weights: sequence
    or token classification, question answering) or of a bare :class:`PrefixEncoder` (no head:
    ``FEATURE_EXTRACTION``) as a PEFT prefix-tuning adapter directory:
    ``PeftModel.from_pretrained(<the unpatched model>, directory)`` then computes what the patched model computes.
    The prefix must cover every layer with one task (``layers=None``, ``num_tasks=1``); a reparameterized prefix is
    written evaluated."""
    if isinstance(model_or_encoder, PrefixEncoder):
        encoder, model, task_type, head_name = model_or_encoder, None, FEATURE_EXTRACTION, None
    elif isinstance(model_or_encoder, nn.Module) and getattr(model_or_encoder, STATE_ATTR, None) is not None:
        model = model_or_encoder
        encoder = getattr(model, STATE_ATTR).encoder
        task_type, head_name = model_head(model)
    else:
        raise TypeError("model_or_encoder must be a model patched with patch_model or its PrefixEncoder, got "
                        f"{type(model_or_encoder).__name__}")
    config = encoder.config
    check_model_type(config.model_type, f"export_peft_adapter of a {config.model_type or 'untyped'} prefix")
    if config.num_tasks != 1 or list(config.layers) != list(range(config.num_hidden_layers)):
        raise ValueError(f"a PEFT adapter holds one task's prefix on every layer; this prefix has num_tasks="
                         f"{config.num_tasks} and layers {list(config.layers)} of {config.num_hidden_layers}")
    head = None if head_name is None else getattr(model, head_name).state_dict()
    with torch.no_grad():
        write_adapter(directory, encoder(), task_type=task_type, head=head,
                      name_or_path=None if model is None else model.__dict__.get("name_or_path"))


def load_peft_adapter(model: nn.Module, directory, *, backend: str = "auto", freeze_backbone: bool = True
                      ) -> PrefixEncoder:
    """Patch an unpatched ``model`` (a family PEFT's format covers) with the prefix of a PEFT prefix-tuning adapter
    directory (P from the adapter, every layer) and load its task head weights into the model's head (if the adapter
    has them); returns the attached encoder. The model then computes what
    ``PeftModel.from_pretrained(model, directory)`` computes. All or nothing: the adapter and its fit to the model
    are checked first; on any error (``CheckpointError`` naming the file) the model is exactly as before."""
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already patched; load_peft_adapter patches an unpatched model "
                           "(unpatch_model it first)")
    check_model_type(model.config.model_type, directory)
    task_type, head_name = model_head(model)
    head_module = None if head_name is None else getattr(model, head_name)
    config = model.config
    adapter = read_adapter(directory, model_type=config.model_type, num_layers=config.num_hidden_layers,
                           num_heads=config.num_attention_heads, hidden_size=config.hidden_size, task_type=task_type,
                           head_name=head_name, head_shapes=None if head_module is None else
                           {k: tuple(v.shape) for k, v in head_module.state_dict().items()})
    encoder = patch_model(model, adapter.prefix.shape[-2], prefix_dropout=0.0, freeze_backbone=freeze_backbone,
                          backend=backend)
    saved_head = None if adapter.head is None else {k: v.clone() for k, v in head_module.state_dict().items()}
    try:
        with torch.no_grad():
            encoder.prefix.copy_(adapter.prefix)
        if adapter.head is not None:
            head_module.load_state_dict(adapter.head)
    except BaseException:
        unpatch_model(model)
        if saved_head is not None:
            head_module.load_state_dict(saved_head)
        raise
    return encoder


__all__ = ["export_peft_adapter", "load_peft_adapter", "read_adapter", "write_adapter", "PeftAdapter"]
