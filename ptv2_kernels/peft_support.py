"""What the installed PEFT can prefix-tune, found by trying it: never written down, because it changes with
releases (PEFT 0.21 refuses BERT/RoBERTa on transformers >= 5.24, where their forward's ``past_key_values`` is
named ``cache``; PEFT 0.22 runs them again). The benchmarks choose their concatenation reference with it and the
tests check the README's claims against it.

- :func:`peft_prefix_tuning_refusal`: one try per model type and process, a tiny random sequence classifier of
  that type wrapped by ``get_peft_model(..., PrefixTuningConfig(task_type=SEQ_CLS))``, one forward with labels and
  a backward that must reach PEFT's prompt embeddings.
- :func:`peft_written_fields`: the version-dependent fields of the ``adapter_config.json`` the installed PEFT
  writes (``peft_version``, ``modules_to_save``), read from PEFT's config of a tiny BERT with the task's head.
Either runs with gradients on (also when called under ``no_grad``) and leaves the global random state as it was.
"""

import functools
from typing import Optional

import torch

PROBE_PREFIX_LEN = 2
_TINY = dict(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
             max_position_embeddings=16, type_vocab_size=1, num_labels=2, pad_token_id=0)


def installed_versions() -> str:
    """``"PEFT <v> on transformers <v>"`` for messages (``"PEFT not installed"`` without PEFT)."""
    import transformers

    try:
        import peft
    except ImportError:
        return f"PEFT not installed (transformers {transformers.__version__})"
    return f"PEFT {peft.__version__} on transformers {transformers.__version__}"


@functools.lru_cache(maxsize=None)
def peft_prefix_tuning_refusal(model_type: str) -> Optional[str]:
    """None where the installed PEFT prefix-tunes (forward and backward) a ``model_type`` model (a transformers
    ``config.model_type``: ``"bert"``, ``"roberta"``, ``"deberta"``, ``"deberta-v2"``, ...) on the installed
    transformers; otherwise why not, with both versions and PEFT's own error. Tried once per process."""
    try:
        from peft import PrefixTuningConfig, TaskType, get_peft_model
    except ImportError:
        return f"{installed_versions()} (pip install 'peft>=0.21')"
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.for_model(model_type, **_TINY)
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            model = get_peft_model(AutoModelForSequenceClassification.from_config(config),
                                   PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=PROBE_PREFIX_LEN))
            ids = torch.randint(1, _TINY["vocab_size"], (2, 3))
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
        grad = model.prompt_encoder["default"].embedding.weight.grad
    except Exception as error:  # noqa: BLE001  (any failure is PEFT's answer; it is reported, not hidden)
        return f"{installed_versions()} refuses prefix tuning of {model_type!r}: {type(error).__name__}: {error}"
    if grad is None or not bool(grad.abs().sum() > 0):
        return f"{installed_versions()} runs prefix tuning of {model_type!r} but its prefix gets no gradient"
    return None


# PEFT task type -> the tiny BERT of that task (the head whose module names PEFT adds to modules_to_save)
_TASK_MODELS = {"FEATURE_EXTRACTION": "BertModel", "SEQ_CLS": "BertForSequenceClassification",
                "TOKEN_CLS": "BertForTokenClassification", "QUESTION_ANS": "BertForQuestionAnswering"}


@functools.lru_cache(maxsize=None)
def peft_written_fields(task_type: str) -> Optional[dict]:
    """``{"peft_version", "modules_to_save"}`` as the installed PEFT writes them for a BERT prefix-tuning adapter of
    ``task_type`` (a PEFT ``TaskType`` name: one of ``FEATURE_EXTRACTION``, ``SEQ_CLS``, ``TOKEN_CLS``,
    ``QUESTION_ANS``); None where PEFT is not installed or refuses BERT. Tried once per task type and process."""
    if task_type not in _TASK_MODELS:
        raise ValueError(f"task_type must be one of {sorted(_TASK_MODELS)}, got {task_type!r}")
    if peft_prefix_tuning_refusal("bert") is not None:
        return None
    import transformers
    from peft import PrefixTuningConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, _TASK_MODELS[task_type])(transformers.BertConfig(**_TINY))
        config = get_peft_model(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=PROBE_PREFIX_LEN)
                                ).peft_config["default"]
    return {"peft_version": config.peft_version, "modules_to_save": config.modules_to_save}


__all__ = ["peft_prefix_tuning_refusal", "peft_written_fields", "installed_versions"]
