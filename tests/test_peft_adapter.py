"""``export_peft_adapter`` / ``load_peft_adapter`` against the installed PEFT itself (CPU, tiny random BERT,
RoBERTa, XLM-RoBERTa, ELECTRA; CI runs both ends of ``peft>=0.21``): the files written equal, byte for byte, what
``PeftModel.save_pretrained`` writes for the same weights; PEFT loads them with the patched model's outputs, also
when written without PEFT installed; adapters PEFT saved load into a patched model with PEFT's outputs."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy
import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model

from ptv2_kernels import export_peft_adapter, load_peft_adapter, patch_model, peft_adapter
from ptv2_kernels.prefix_encoder import prefix_to_flat

from . import test_patch_deberta as deberta_tests
from .test_patch_bert import PREFIX_LEN, random_inputs, real_outputs, tiny_model

TASKS = {"Model": TaskType.FEATURE_EXTRACTION, "ForSequenceClassification": TaskType.SEQ_CLS,
         "ForTokenClassification": TaskType.TOKEN_CLS, "ForQuestionAnswering": TaskType.QUESTION_ANS}
HEAD_MODULES = {"ForSequenceClassification": "classifier", "ForTokenClassification": "classifier",
                "ForQuestionAnswering": "qa_outputs"}
TOL = dict(rtol=1e-4, atol=1e-5)
FAMILIES = ["bert", "roberta", "xlm-roberta", "electra"]  # CamemBERT is XLM-RoBERTa's code under its name


def peft_run(peft_model, inputs):
    """PEFT's outputs on ``inputs`` (FEATURE_EXTRACTION: the base model's; else the head's)."""
    with torch.no_grad():
        return peft_model(**inputs)


def assert_same_outputs(actual, expected, mask):
    for a, e in zip(real_outputs(actual, mask), real_outputs(expected, mask), strict=False):
        torch.testing.assert_close(a, e, **TOL)


def trained_patched_model(family, head, **options):
    """A patched model with a random prefix and (for a head) random head weights, and an unpatched copy."""
    model = tiny_model(family, head)
    original = copy.deepcopy(model)
    encoder = patch_model(model, PREFIX_LEN, **options)
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(std=0.5)
        if head in HEAD_MODULES:
            for parameter in getattr(model, HEAD_MODULES[head]).parameters():
                parameter.normal_()
    return model, original, encoder


@pytest.mark.parametrize("head", list(TASKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_export_equals_peft_save_pretrained_and_loads_in_peft(family, head, tmp_path):
    model, original, encoder = trained_patched_model(family, head)
    export_peft_adapter(model, tmp_path / "ours")
    # PEFT holding the same prefix and head weights writes the same two files
    peft_model = get_peft_model(copy.deepcopy(original), PrefixTuningConfig(task_type=TASKS[head],
                                                                            num_virtual_tokens=PREFIX_LEN))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prefix_to_flat(encoder.prefix))
        if head in HEAD_MODULES:
            saved = getattr(peft_model.base_model, HEAD_MODULES[head]).modules_to_save["default"]
            saved.load_state_dict(getattr(model, HEAD_MODULES[head]).state_dict())
    peft_model.save_pretrained(tmp_path / "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ours").eval()
    inputs = random_inputs(model)
    assert_same_outputs(model(**inputs), peft_run(loaded, inputs), inputs["attention_mask"])


@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_a_reparameterized_prefix_and_of_a_bare_encoder(family, tmp_path):
    """With projection the prefix is written evaluated; a bare encoder exports as FEATURE_EXTRACTION."""
    model, original, encoder = trained_patched_model(family, "Model", prefix_projection=True, prefix_hidden_size=8)
    export_peft_adapter(encoder, tmp_path / "encoder")
    export_peft_adapter(model, tmp_path / "model")
    assert (tmp_path / "encoder" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "model" / "adapter_model.safetensors").read_bytes()
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "encoder").eval()
    inputs = random_inputs(model)
    assert_same_outputs(model(**inputs), peft_run(loaded, inputs), inputs["attention_mask"])


@pytest.mark.parametrize("head", list(TASKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_load_gives_peft_outputs_and_trains(family, head, tmp_path):
    model = tiny_model(family, head)
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type=TASKS[head],
                                                                         num_virtual_tokens=PREFIX_LEN + 1))
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # the prompt embeddings and PEFT's trainable head copy
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    encoder = load_peft_adapter(model, tmp_path / "adapter")
    assert encoder.config.prefix_len == PREFIX_LEN + 1 and model.prefix_encoder is encoder
    inputs = random_inputs(model)
    assert_same_outputs(model(**inputs), peft_run(peft_model.eval(), inputs), inputs["attention_mask"])
    model.train()
    sum(t.sum() for t in real_outputs(model(**inputs), inputs["attention_mask"])).backward()
    assert encoder.prefix.grad.abs().sum() > 0


def test_written_without_peft_installed_loads_in_peft(tmp_path, monkeypatch):
    """Without PEFT the files are in the stated format, which the installed PEFT loads."""
    model, original, _ = trained_patched_model("bert", "ForSequenceClassification")
    monkeypatch.setattr(peft_adapter, "peft_written_fields", lambda task_type: None)
    export_peft_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_version"] == peft_adapter.FORMAT_PEFT_VERSION
    assert config["modules_to_save"] == ["classifier", "score"] * 2
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a").eval()
    inputs = random_inputs(model)
    assert_same_outputs(model(**inputs), peft_run(loaded, inputs), inputs["attention_mask"])


def test_round_trip_through_our_files(tmp_path):
    model, original, encoder = trained_patched_model("roberta", "ForSequenceClassification")
    export_peft_adapter(model, tmp_path / "a")
    load_peft_adapter(original, tmp_path / "a")
    inputs = random_inputs(model)
    torch.testing.assert_close(original(**inputs).logits, model(**inputs).logits)
    assert torch.equal(original.prefix_encoder.prefix, encoder.prefix)


def test_what_peft_cannot_hold_is_refused(tmp_path):
    deberta = deberta_tests.tiny_model("v1")
    patch_model(deberta, PREFIX_LEN)
    with pytest.raises(ValueError, match=r"PEFT refuses 'deberta' \(PEFT 0.21 prefix tuning needs a backbone "
                                         r"forward with past_key_values"):
        export_peft_adapter(deberta, tmp_path / "d")
    with pytest.raises(ValueError, match="PEFT refuses 'deberta-v2'"):
        load_peft_adapter(deberta_tests.tiny_model("v2-noshare"), tmp_path / "d")
    for options, error in [({"layers": [1]}, r"layers \[1\] of 2"), ({"num_tasks": 2}, "num_tasks=2")]:
        model = tiny_model("bert")
        patch_model(model, PREFIX_LEN, **options)
        with pytest.raises(ValueError, match=error):
            export_peft_adapter(model, tmp_path / "x")
    masked = tiny_model("bert", "ForMaskedLM")
    patch_model(masked, PREFIX_LEN)
    with pytest.raises(TypeError, match="BertForMaskedLM"):
        export_peft_adapter(masked, tmp_path / "x")
    with pytest.raises(TypeError, match="patched with patch_model"):
        export_peft_adapter(tiny_model("bert"), tmp_path / "x")
    with pytest.raises(RuntimeError, match="already patched"):
        load_peft_adapter(masked, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()
