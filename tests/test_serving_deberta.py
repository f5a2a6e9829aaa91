"""PrefixServer on tiny random DeBERTa (v1) and DeBERTa-v2 models (CPU, no downloads), packed (the default) and
padded: mixed-task batches equal each row run alone through its own single-prefix patched model, packed equals the
padded patched model on both backends (v2's convolution layer, log buckets, c2p or p2c alone, span < N, prompt
depth), per-task pooler + classifier, bad requests, checkpoints (save_prefix files, banks, P-Tuning v2 state
dicts; PEFT refused)."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy

import pytest
import torch

from ptv2_kernels.serving import PrefixServer, Request
from ptv2_kernels.serving.checkpoints import load_bank, load_task, save_bank, write_peft_adapter

from .test_patch_deberta import tiny_model
from .test_serving import HEADS, PREFIX_LEN, TOL, random_requests, serve, single_task_output
from .test_serving_checkpoints import thudm_expected, thudm_state

# v1: absolute positions (shifted by P), c2p|p2c; v2: relative positions only, log buckets, shared keys (as v3).
CONFIGS = ["v1", "v2-share-buckets"]
POOLED_HEAD_KEYS = {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"}


def own_head(server, seed=2):
    """Random weights for the server's per-task head module."""
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in server.head.module.state_dict().items()}


def with_head(model, head):
    """A copy of ``model`` with a task's own DeBERTa ``pooler.*`` + ``classifier.*`` weights."""
    model = copy.deepcopy(model)
    assert not model.load_state_dict(head, strict=False).unexpected_keys
    return model


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("config", CONFIGS)
def test_mixed_batch_equals_each_row_alone(config, head, packed):
    server, reference = serve(tiny_model(config, head), packed=None if packed else False)
    assert server.packed == packed
    requests = random_requests(server.tasks())
    for request, result in zip(requests, server.predict(requests)):
        assert result.error is None and result.num_tokens == len(request.input_ids)
        expected = single_task_output(reference, server.task_prefix(request.task), head, request)
        torch.testing.assert_close(result.output, expected, **TOL)


@pytest.mark.parametrize("config", CONFIGS)
def test_per_task_pooler_and_classifier(config):
    """DeBERTa tasks bring their pooler and classifier (both trained by P-Tuning v2); others use the model's."""
    server, reference = serve(tiny_model(config))
    head = own_head(server)
    assert set(head) == POOLED_HEAD_KEYS and server.head.module_name == "pooler+classifier"
    server.add_task("task0", server.task_prefix("task0"), head, replace=True)
    requests = random_requests(server.tasks())
    for request, result in zip(requests, server.predict(requests)):
        model = with_head(reference, head) if request.task == "task0" else reference
        expected = single_task_output(model, server.task_prefix(request.task), "ForSequenceClassification", request)
        torch.testing.assert_close(result.output, expected, **TOL)
    classifier_only = {k: v for k, v in head.items() if k.startswith("classifier.")}
    with pytest.raises(ValueError, match=r"pooler\+classifier: missing \['pooler.dense.bias', 'pooler.dense.weight'\]"):
        server.add_task("bad", server.task_prefix("task1"), classifier_only)


@pytest.mark.parametrize("config,max_length", [("v1", 24 - PREFIX_LEN), ("v2-share-buckets", 24)])
def test_bad_requests_get_errors_others_are_served(config, max_length):
    """v1 shifts absolute positions by P; v2 without absolute positions keeps max_position_embeddings."""
    server, _ = serve(tiny_model(config))
    assert server.max_length == max_length
    good = [Request("task0", input_ids=[3, 4]), Request("task2", input_ids=[5, 6, 7], token_type_ids=[0, 0, 1])]
    bad = [Request("missing", input_ids=[3, 4]), Request("task1", input_ids=list(range(2, 3 + max_length))),
           Request("task1", input_ids=[]), Request("task1", input_ids=[3, 999]),
           Request("task1", input_ids=[3, 4], token_type_ids=[0, 2]), Request("task1", text="no tokenizer")]
    results = server.predict(good[:1] + bad + good[1:])
    errors = [r.error for r in results[1:-1]]
    assert "unknown task 'missing'" in errors[0] and f"at most {max_length} fit" in errors[1]
    assert "empty" in errors[2] and "[0, 64)" in errors[3] and "[0, 2)" in errors[4] and "no tokenizer" in errors[5]
    for result, request in zip(results[:1] + results[-1:], good):
        torch.testing.assert_close(result.output, server.predict([request])[0].output, **TOL)


def lively(model, seed=5):
    """``model`` with every weight matrix redrawn at std 0.3: at transformers' std 0.02 the relative terms and the
    convolution change the outputs by less than the tolerance, so a packed walk without them would pass."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.3)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("config,layers", [("v1", None), ("v2-share-buckets", None), ("v1-span4-c2p", [1]),
                                           ("v2-p2c-buckets", [0])],
                         ids=["v1", "v2-conv-buckets", "v1-span<N-c2p-depth1", "v2-p2c-depth0"])
def test_packed_equals_padded_patched_model(config, layers, backend):
    """Packed (varlen kernels, relative terms by positions within each row, v2's conv with zero gaps) against the
    padded patched model on the torch backend, which test_patch_deberta checks against transformers."""
    padded, _ = serve(lively(tiny_model(config, "ForTokenClassification")), packed=False, backend="torch",
                      layers=layers)
    packed, _ = serve(lively(tiny_model(config, "ForTokenClassification")), backend=backend, layers=layers)
    assert packed.packed and not padded.packed
    requests = random_requests(padded.tasks(), count=7, seed=11)
    requests += [Request("task1", input_ids=[5, 1, 7, 9, 1], token_type_ids=[0, 0, 1, 1, 1]),  # pad ids inside
                 Request("task2", input_ids=[4]), Request("task0", input_ids=list(range(2, 2 + padded.max_length)))]
    for a, b in zip(padded.predict(requests), packed.predict(requests)):
        assert a.error is None and b.error is None
        torch.testing.assert_close(b.output, a.output, **TOL)


def test_server_argument_checks():
    assert PrefixServer(tiny_model("v1"), PREFIX_LEN, packed=False).packed is False
    with pytest.raises(TypeError, match="ForSequenceClassification"):
        PrefixServer(tiny_model("v1", "ForQuestionAnswering"), PREFIX_LEN)


def test_checkpoints(tmp_path):
    """Banks (with a pooler + classifier head) and save_prefix files round-trip; P-Tuning v2 state dicts share
    BERT's flat layout; PEFT is refused both ways; another model type is named."""
    server, _ = serve(tiny_model("v2-share-buckets"), tasks=2)
    server.add_task("task0", server.task_prefix("task0"), own_head(server), replace=True)
    save_bank(server, tmp_path / "bank")
    requests = random_requests(server.tasks(), count=5)
    expected = server.predict(requests)
    again, _ = serve(tiny_model("v2-share-buckets"), tasks=0)
    assert load_bank(again, tmp_path / "bank") == ["task0", "task1"]
    for a, b in zip(again.predict(requests), expected):
        torch.testing.assert_close(a.output, b.output)
    load_task(again, "file", tmp_path / "bank" / "task-001.safetensors")
    torch.testing.assert_close(again.task_prefix("file"), server.task_prefix("task1"))
    state = thudm_state(False, backbone="deberta")
    load_task(again, "ref", state)
    torch.testing.assert_close(again.task_prefix("ref"), thudm_expected(state, False))
    with pytest.raises(ValueError, match="PEFT refuses 'deberta-v2'"):
        write_peft_adapter(server, "task0", tmp_path / "peft")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(ValueError, match="PEFT refuses 'deberta-v2'"):
        load_task(again, "peft", tmp_path / "peft")
    v1, _ = serve(tiny_model("v1"), tasks=0)
    with pytest.raises(ValueError, match="model_type 'deberta-v2' != 'deberta'"):
        load_bank(v1, tmp_path / "bank")
    assert v1.tasks() == [] and again.tasks() == ["task0", "task1", "file", "ref"]
