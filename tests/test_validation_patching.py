"""Bad input to the patching, encoder and checkpoint surface, table-driven: ``patch_model``'s arguments, a patched
model's forward inputs, ``load_prefix`` files and ``load_peft_adapter`` directories. Each case asserts the exception
type, that the message names the argument as the caller wrote it (or the file), and that the model is exactly as
before (hooks, instance attributes, configs, ``requires_grad``, weights, outputs)."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptv2_kernels import load_peft_adapter, load_prefix, patch_model, save_prefix
from ptv2_kernels.errors import CheckpointError

from .test_patch_bert import PREFIX_LEN, random_inputs, tiny_model
from .test_patch_compat import assert_unchanged, snapshot

# ---- patch_model arguments ---------------------------------------------------------------------------------
ARGUMENTS = [
    # (options, exception, the argument the message names)
    ({"layers": [0.5]}, TypeError, "layers"), ({"layers": [True]}, TypeError, "layers"),
    ({"layers": "01"}, TypeError, "layers"), ({"layers": 1}, TypeError, "layers"),
    ({"layers": [2]}, ValueError, "layers"), ({"layers": [0, -2]}, ValueError, "layers"),
    ({"layers": []}, ValueError, "layers"),
    ({"prefix_len": 0}, ValueError, "prefix_len"), ({"prefix_len": 2.5}, TypeError, "prefix_len"),
    ({"prefix_len": True}, TypeError, "prefix_len"), ({"prefix_len": "4"}, TypeError, "prefix_len"),
    ({"prefix_hidden_size": 0}, ValueError, "prefix_hidden_size"),
    ({"prefix_hidden_size": 8.0}, TypeError, "prefix_hidden_size"),
    ({"num_tasks": 0}, ValueError, "num_tasks"), ({"num_tasks": 2.0}, TypeError, "num_tasks"),
    ({"prefix_dropout": 1.0}, ValueError, "prefix_dropout"), ({"prefix_dropout": -0.1}, ValueError, "prefix_dropout"),
    ({"prefix_dropout": "0.1"}, TypeError, "prefix_dropout"), ({"prefix_dropout": True}, TypeError, "prefix_dropout"),
    ({"prefix_projection": 1}, TypeError, "prefix_projection"),
    ({"freeze_backbone": "yes"}, TypeError, "freeze_backbone"),
    ({"backend": "cuda2"}, ValueError, "backend"), ({"backend": None}, TypeError, "backend"),
]


@pytest.mark.parametrize("options,exception,argument", ARGUMENTS, ids=[str(a[0]) for a in ARGUMENTS])
def test_patch_model_arguments(options, exception, argument):
    model = tiny_model("bert")
    inputs = random_inputs(model)
    logits, before = model(**inputs).logits, snapshot(model)
    options = {"prefix_len": PREFIX_LEN, **options}
    with pytest.raises(exception, match=rf"\b{argument}\b") as caught:
        patch_model(model, **options)
    assert type(caught.value) is exception
    assert_unchanged(model, before, inputs, logits)


def test_model_that_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel, got str"):
        patch_model("bert-base-uncased", PREFIX_LEN)


# ---- forward inputs of a patched model ---------------------------------------------------------------------
def _wrong_length_mask(inputs):
    return {**inputs, "attention_mask": inputs["attention_mask"][:, :-1]}


FORWARD_INPUTS = {
    "attention_mask one short": (_wrong_length_mask, {}, ValueError, r"attention_mask .*\[3, 7\].*got \[3, 6\]"),
    "attention_mask 1D": (lambda x: {**x, "attention_mask": x["attention_mask"][0]}, {}, ValueError,
                          r"attention_mask .*got \[7\]"),
    "attention_mask 4D": (lambda x: {**x, "attention_mask": x["attention_mask"][:, None, None]}, {}, ValueError,
                          r"attention_mask .*2D"),
    "task_ids a list": (lambda x: {**x, "task_ids": [0, 1, 0]}, {"num_tasks": 2}, TypeError, r"task_ids .*list"),
    "task_ids float": (lambda x: {**x, "task_ids": torch.zeros(3)}, {"num_tasks": 2}, TypeError,
                       r"task_ids .*float32"),
    "task_ids out of range": (lambda x: {**x, "task_ids": torch.tensor([0, 2, 1])}, {"num_tasks": 2}, ValueError,
                              r"task_ids must lie in \[0, 2\)"),
    "task_ids without a bank": (lambda x: {**x, "task_ids": torch.tensor([0, 0, 0])}, {}, ValueError,
                                r"task_ids was given"),
}


@pytest.mark.parametrize("case", FORWARD_INPUTS)
def test_forward_inputs(case):
    change, options, exception, message = FORWARD_INPUTS[case]
    model = tiny_model("bert")
    patch_model(model, PREFIX_LEN, **options)
    inputs = random_inputs(model)
    task_ids = {"task_ids": torch.tensor([0, 1, 0])} if options else {}
    logits = model(**inputs, **task_ids).logits
    with pytest.raises(exception, match=message):
        model(**change({**inputs, **task_ids}))
    assert torch.equal(model(**inputs, **task_ids).logits, logits)  # no state left behind by the failed call


# ---- load_prefix files -------------------------------------------------------------------------------------
def saved_prefix(tmp_path, family="bert", **options):
    """A valid prefix file of a patched tiny model, and its tensors and metadata."""
    model = tiny_model(family)
    encoder = patch_model(model, PREFIX_LEN, **options)
    path = tmp_path / "prefix.safetensors"
    save_prefix(encoder, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return path, load_file(str(path)), metadata


def _rewrite(tensors=None, metadata=None, config=None):
    """A corruption: the file rewritten with other tensors, metadata or config fields (its metadata JSON edited)."""
    def write(p, saved_tensors, saved_metadata):
        tensors_out = saved_tensors if tensors is None else tensors(saved_tensors)
        metadata_out = saved_metadata if metadata is None else metadata(saved_metadata)
        if config is not None:
            values = json.loads(saved_metadata["ptv2_prefix_config"])
            metadata_out = {"ptv2_prefix_config": json.dumps(config(values))}
        save_file(tensors_out, str(p), metadata=metadata_out)
    return write


def _bytes(data):
    def write(path, tensors, metadata):
        path.write_bytes(data(path.read_bytes()))
    return write


PREFIX_FILES = {
    "garbage bytes": (_bytes(lambda b: b"\x00garbage" * 8), CheckpointError, "not a readable safetensors file"),
    "truncated": (_bytes(lambda b: b[: len(b) // 2]), CheckpointError, "not a readable safetensors file"),
    "no metadata": (_rewrite(metadata=lambda m: {}), CheckpointError, "not a prefix file written by save_prefix"),
    "metadata not JSON": (_rewrite(metadata=lambda m: {"ptv2_prefix_config": "{not json"}), CheckpointError,
                          "not valid JSON"),
    "metadata a JSON list": (_rewrite(metadata=lambda m: {"ptv2_prefix_config": "[1, 2]"}), CheckpointError,
                             "must be a JSON object, got list"),
    "metadata missing a field": (_rewrite(config=lambda c: {k: v for k, v in c.items() if k != "num_heads"}),
                                 CheckpointError, r"lacks \['num_heads'\]"),
    "metadata format version": (_rewrite(config=lambda c: {**c, "format_version": 99}), CheckpointError,
                                "format version 99"),
    "metadata invalid value": (_rewrite(config=lambda c: {**c, "prefix_len": -1}), CheckpointError,
                               "not a valid PrefixConfig .*prefix_len"),
    "tensor shape vs metadata": (_rewrite(tensors=lambda t: {"prefix": t["prefix"][..., :-1].contiguous()}),
                                 CheckpointError, r"tensor 'prefix' is torch.float32 \[2, 2, 2, 4, 15\]"),
    "unexpected tensor": (_rewrite(tensors=lambda t: {**t, "extra": torch.zeros(1)}), CheckpointError,
                          r"tensors \['extra', 'prefix'\]"),
    "integer tensor": (_rewrite(tensors=lambda t: {"prefix": t["prefix"].long()}), CheckpointError,
                       "torch.int64 .*floating-point"),
    "other model": (_rewrite(config=lambda c: {**c, "num_heads": 4, "head_dim": 8},
                             tensors=lambda t: {"prefix": torch.randn(2, 2, 4, 4, 8)}), CheckpointError,
                    r"does not match BertForSequenceClassification \(saved != model\): num_heads 4 != 2"),
    "layer out of range": (_rewrite(config=lambda c: {**c, "num_hidden_layers": 3, "layers": [2]},
                                    tensors=lambda t: {"prefix": t["prefix"][:1].contiguous()}), CheckpointError,
                           "does not match BertForSequenceClassification: layers must be indices"),
    "model type": (_rewrite(config=lambda c: {**c, "model_type": "roberta"}), CheckpointError,
                   "model_type 'roberta' != 'bert'"),
}


MODEL_FIT_CASES = ("other model", "layer out of range", "model type")  # valid files that do not fit the model


@pytest.mark.parametrize("case", PREFIX_FILES)
def test_load_prefix_files(case, tmp_path):
    corrupt, exception, message = PREFIX_FILES[case]
    path, tensors, metadata = saved_prefix(tmp_path)
    corrupt(path, tensors, metadata)
    model = tiny_model("bert")
    inputs = random_inputs(model)
    logits, before = model(**inputs).logits, snapshot(model)
    with pytest.raises(exception, match=message) as caught:
        load_prefix(path, model)
    assert str(path) in str(caught.value)
    assert_unchanged(model, before, inputs, logits)
    if case not in MODEL_FIT_CASES:  # the file itself is bad: the standalone encoder is refused the same way
        with pytest.raises(exception, match=re.escape(str(path))):
            load_prefix(path)


def test_load_prefix_missing_file_and_arguments(tmp_path):
    model = tiny_model("bert")
    inputs = random_inputs(model)
    logits, before = model(**inputs).logits, snapshot(model)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.safetensors"))):
        load_prefix(tmp_path / "none.safetensors", model)
    path, _, _ = saved_prefix(tmp_path)
    with pytest.raises(ValueError, match=r"\bbackend\b"):
        load_prefix(path, model, backend="gpu")
    with pytest.raises(TypeError, match=r"\bfreeze_backbone\b"):
        load_prefix(path, model, freeze_backbone=None)
    assert_unchanged(model, before, inputs, logits)
    patch_model(model, PREFIX_LEN)
    patched_logits, patched = model(**inputs).logits, snapshot(model)
    with pytest.raises(RuntimeError, match="already patched"):
        load_prefix(path, model)
    assert_unchanged(model, patched, inputs, patched_logits)


# ---- PEFT adapter directories ------------------------------------------------------------------------------
def saved_adapter(tmp_path, head="ForSequenceClassification"):
    """A valid adapter (what export_peft_adapter and PEFT write) of a tiny BERT."""
    from ptv2_kernels import export_peft_adapter

    model = tiny_model("bert", head)
    patch_model(model, PREFIX_LEN)
    export_peft_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _config(edit):
    def write(directory):
        path = directory / "adapter_config.json"
        path.write_text(edit(path.read_text()))
    return write


def _weights(edit):
    def write(directory):
        path = directory / "adapter_model.safetensors"
        save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})
    return write


def _json_edit(change):
    return _config(lambda text: json.dumps(change(json.loads(text))))


ADAPTERS = {
    "config a JSON list": (_config(lambda t: "[1, 2, 3]"), "adapter_config.json", "must hold a JSON object"),
    "config not JSON": (_config(lambda t: t[:-3]), "adapter_config.json", "is not a PEFT adapter: cannot read"),
    "config missing num_layers": (_json_edit(lambda c: {k: v for k, v in c.items() if k != "num_layers"}),
                                  "adapter_config.json", r"lacks valid fields: num_layers \(int\)"),
    "config token_dim a string": (_json_edit(lambda c: {**c, "token_dim": "32"}), "adapter_config.json",
                                  r"lacks valid fields: token_dim"),
    "LORA": (_json_edit(lambda c: {**c, "peft_type": "LORA"}), "adapter", "LORA adapter, not PREFIX_TUNING"),
    "num_layers": (_json_edit(lambda c: {**c, "num_layers": 3}), "adapter", "num_layers 3 != 2"),
    "task type of another head": (_json_edit(lambda c: {**c, "task_type": "TOKEN_CLS"}), "adapter",
                                  "task_type 'TOKEN_CLS' != 'SEQ_CLS'"),
    "unknown task type": (_json_edit(lambda c: {**c, "task_type": "CAUSAL_LM"}), "adapter_config.json",
                          "task_type 'CAUSAL_LM'"),
    "two submodules": (_json_edit(lambda c: {**c, "num_transformer_submodules": 2}), "adapter",
                       "num_transformer_submodules 2 != 1"),
    "weights garbage": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"nope"), "adapter_model.safetensors",
                        "cannot read the state dict file"),
    "prompt wrong shape": (_weights(lambda w: {**w, "prompt_embeddings": w["prompt_embeddings"][:, :-1].contiguous()}),
                           "adapter_model.safetensors", r"'prompt_embeddings' must be .*\[4, 128\], got torch.float32 "
                                                        r"\[4, 127\]"),
    "prompt missing": (_weights(lambda w: {k: v for k, v in w.items() if k != "prompt_embeddings"}),
                       "adapter_model.safetensors", "got none"),
    "head wrong shape": (_weights(lambda w: {**w, "base_model.classifier.weight": torch.zeros(3, 32)}),
                         "adapter_model.safetensors", "classifier weights .* do not fit"),
    "unexpected key": (_weights(lambda w: {**w, "base_model.bert.pooler.dense.bias": torch.zeros(32)}),
                       "adapter_model.safetensors", "keys this model cannot use"),
    "no directory": (lambda d: [p.unlink() for p in d.iterdir()] and d.rmdir(), "adapter", "cannot read"),
}


@pytest.mark.parametrize("case", ADAPTERS)
def test_load_peft_adapter_directories(case, tmp_path):
    corrupt, named, message = ADAPTERS[case]
    directory = saved_adapter(tmp_path)
    corrupt(directory)
    model = tiny_model("bert")
    inputs = random_inputs(model)
    logits, before = model(**inputs).logits, snapshot(model)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_peft_adapter(model, directory)
    assert re.search(rf"{re.escape(str(directory))}(/{named})?\b" if named != "adapter" else re.escape(str(directory)),
                     str(caught.value))
    assert named == "adapter" or named in str(caught.value)
    assert_unchanged(model, before, inputs, logits)
