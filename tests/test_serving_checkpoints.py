"""Task checkpoints of the server (CPU, tiny random models): bank directories, save_prefix files, PEFT 0.21
adapters both ways (same logits as PEFT itself), P-Tuning v2 reference (THUDM) state dicts, and clear
errors for corrupt or mismatched files with nothing loaded."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy
import json
import os

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from torch import nn

from ptv2_kernels import PrefixConfig, PrefixEncoder, save_prefix
from ptv2_kernels.prefix_encoder import prefix_from_flat
from ptv2_kernels.serving import PrefixServer
from ptv2_kernels.serving.checkpoints import load_bank, load_task, read_task, save_bank, write_peft_adapter

from .test_patch_bert import FAMILIES, PREFIX_LEN, tiny_model
from .test_serving import random_requests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = dict(rtol=1e-4, atol=1e-5)
PEFT_TASKS = {"ForSequenceClassification": TaskType.SEQ_CLS, "ForTokenClassification": TaskType.TOKEN_CLS,
              "Model": TaskType.FEATURE_EXTRACTION}


def server_for(model, **options):
    return PrefixServer(model, PREFIX_LEN, max_tasks=4, **options)


def peft_outputs(peft_model, head, requests):
    """PEFT's output for each request run alone (as the server reports it)."""
    outputs = []
    for request in requests:
        ids = torch.tensor([request.input_ids])
        with torch.no_grad():
            out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        outputs.append(out.last_hidden_state[0].mean(0) if head == "Model" else out.logits[0])
    return outputs


def assert_outputs(results, expected):
    for result, want in zip(results, expected):
        assert result.error is None
        torch.testing.assert_close(result.output, want, **TOL)


@pytest.mark.parametrize("head", list(PEFT_TASKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_import_gives_peft_logits(family, head, tmp_path):
    model = tiny_model(family, head)
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type=PEFT_TASKS[head],
                                                                         num_virtual_tokens=PREFIX_LEN))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # the prompt embeddings and the trainable classifier copy
                parameter.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    server = server_for(model)
    load_task(server, "peft", tmp_path / "adapter")
    assert (server.task_head("peft") is not None) == (head != "Model")
    requests = random_requests(["peft"], count=4)
    assert_outputs(server.predict(requests), peft_outputs(peft_model.eval(), head, requests))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_projection_adapter_import(family, tmp_path):
    """PEFT stores a reparameterized prefix already evaluated; it imports like a plain one."""
    model = tiny_model(family)
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(
        task_type=TaskType.SEQ_CLS, num_virtual_tokens=PREFIX_LEN, prefix_projection=True, encoder_hidden_size=24))
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in peft_model.prompt_encoder.parameters():
            parameter.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    server = server_for(model)
    load_task(server, "proj", tmp_path / "adapter")
    requests = random_requests(["proj"], count=3)
    assert_outputs(server.predict(requests), peft_outputs(peft_model.eval(), "ForSequenceClassification", requests))


@pytest.mark.parametrize("head", list(PEFT_TASKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_loads_in_peft_with_same_logits(family, head, tmp_path):
    model = tiny_model(family, head)
    original = copy.deepcopy(model)
    server = server_for(model)
    torch.manual_seed(5)
    own_head = None if head == "Model" else {k: torch.randn_like(v) for k, v in model.classifier.state_dict().items()}
    server.add_task("mine", torch.randn(server.prefix_shape), own_head)
    server.add_task("shared-head", torch.randn(server.prefix_shape))
    requests = random_requests(["mine", "shared-head"], count=6)
    results = server.predict(requests)
    for task in ("mine", "shared-head"):
        write_peft_adapter(server, task, tmp_path / task)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / task).eval()
        mine = [i for i, r in enumerate(requests) if r.task == task]
        assert_outputs([results[i] for i in mine], peft_outputs(peft_model, head, [requests[i] for i in mine]))


def test_peft_export_round_trips_through_import(tmp_path):
    server = server_for(tiny_model("roberta"))
    server.add_task("a", torch.randn(server.prefix_shape))
    write_peft_adapter(server, "a", tmp_path / "a")
    checkpoint = read_task(server, tmp_path / "a")
    torch.testing.assert_close(checkpoint.prefix, server.task_prefix("a"))
    torch.testing.assert_close(checkpoint.head, server.head.module.state_dict())


def test_peft_adapter_mismatches_are_named(tmp_path):
    model = tiny_model("bert")
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                                                         num_virtual_tokens=PREFIX_LEN + 2))
    peft_model.save_pretrained(tmp_path / "p6")
    server = server_for(model)
    with pytest.raises(ValueError, match="num_virtual_tokens 6 != 4"):
        load_task(server, "x", tmp_path / "p6")
    token_server = server_for(tiny_model("bert", "ForTokenClassification"))
    peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                                                         num_virtual_tokens=PREFIX_LEN))
    peft_model.save_pretrained(tmp_path / "seqcls")
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS' != 'TOKEN_CLS'"):
        load_task(token_server, "x", tmp_path / "seqcls")
    config = json.loads((tmp_path / "seqcls" / "adapter_config.json").read_text())
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="LORA adapter, not PREFIX_TUNING"):
        load_task(server, "x", tmp_path / "lora")
    (tmp_path / "seqcls" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the state dict file"):
        load_task(server, "x", tmp_path / "seqcls")
    assert server.tasks() == [] and token_server.tasks() == []


def test_bank_directory_round_trip(tmp_path):
    model = tiny_model("bert")
    server = server_for(model)
    torch.manual_seed(6)
    head = {k: torch.randn_like(v) for k, v in model.classifier.state_dict().items()}
    server.add_tasks({"a": (torch.randn(server.prefix_shape), head), "b": (torch.randn(server.prefix_shape), None)})
    save_bank(server, tmp_path / "bank")
    requests = random_requests(["a", "b"], count=5)
    expected = server.predict(requests)
    served_again = server_for(tiny_model("bert"))
    assert load_bank(served_again, tmp_path / "bank") == ["a", "b"]
    assert served_again.task_head("b") is None
    for a, b in zip(served_again.predict(requests), expected):
        torch.testing.assert_close(a.output, b.output)


def test_corrupt_or_mismatched_bank_loads_nothing(tmp_path):
    server = server_for(tiny_model("bert"))
    server.add_tasks({"a": (torch.randn(server.prefix_shape), None), "b": (torch.randn(server.prefix_shape), None)})
    save_bank(server, tmp_path / "bank")
    fresh = server_for(tiny_model("bert"))
    fresh.add_task("keep", torch.zeros(fresh.prefix_shape))
    (tmp_path / "bank" / "task-001.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read the prefix file .*task-001"):
        load_bank(fresh, tmp_path / "bank")
    assert fresh.tasks() == ["keep"]
    longer = PrefixServer(tiny_model("bert"), PREFIX_LEN + 1, max_tasks=2)
    longer.add_task("c", torch.randn(longer.prefix_shape))
    save_bank(longer, tmp_path / "p5")
    with pytest.raises(ValueError, match="prefix_len 5 != 4"):
        load_bank(fresh, tmp_path / "p5")
    roberta = server_for(tiny_model("roberta"))
    with pytest.raises(ValueError, match="model_type 'bert' != 'roberta'"):
        load_bank(roberta, tmp_path / "bank")
    with pytest.raises(ValueError, match="not a prefix bank directory"):
        load_bank(fresh, tmp_path)
    assert fresh.tasks() == ["keep"] and roberta.tasks() == []


def test_save_prefix_file_with_projection_is_evaluated_once(tmp_path):
    config = PrefixConfig(prefix_len=PREFIX_LEN, num_heads=2, head_dim=16, num_hidden_layers=2, layers=(0, 1),
                          prefix_projection=True, prefix_hidden_size=24, model_type="roberta")
    encoder = PrefixEncoder(config)
    save_prefix(encoder, tmp_path / "proj.safetensors")
    server = server_for(tiny_model("roberta"))
    load_task(server, "p", tmp_path / "proj.safetensors")
    torch.testing.assert_close(server.task_prefix("p"), encoder().detach())
    depth = server_for(tiny_model("roberta"), layers=[1])
    with pytest.raises(ValueError, match=r"layers \(0, 1\) != \(1,\)"):
        load_task(depth, "p", tmp_path / "proj.safetensors")


def thudm_state(projection, hidden=32, layers=2, prefix_hidden=24, seed=7, backbone="bert"):
    """A reference ``BertPrefixForSequenceClassification``-style state dict (``prefix_encoder.*`` and a backbone key
    that the served model lacks)."""
    torch.manual_seed(seed)
    if projection:
        module = nn.ModuleDict({"embedding": nn.Embedding(PREFIX_LEN, hidden), "trans": nn.Sequential(
            nn.Linear(hidden, prefix_hidden), nn.Tanh(), nn.Linear(prefix_hidden, 2 * layers * hidden))})
    else:
        module = nn.ModuleDict({"embedding": nn.Embedding(PREFIX_LEN, 2 * layers * hidden)})
    state = {f"prefix_encoder.{k}": v for k, v in module.state_dict().items()}
    state[f"{backbone}.unused.bias"] = torch.zeros(hidden)
    return state


def thudm_expected(state, projection):
    """The compact prefix the package's own code gives for ``state``: ``prefix_from_flat`` of the plain
    embedding, or a projection ``PrefixEncoder`` (its MLP is the reference's ``trans``) fed the same weights."""
    if not projection:
        return prefix_from_flat(state["prefix_encoder.embedding.weight"], 2, 2)
    encoder = PrefixEncoder(PrefixConfig(prefix_len=PREFIX_LEN, num_heads=2, head_dim=16, num_hidden_layers=2,
                                         layers=(0, 1), prefix_projection=True, prefix_hidden_size=24))
    encoder.load_state_dict({k.replace("prefix_encoder.", "").replace("trans.", "mlp."): v
                             for k, v in state.items() if k.startswith("prefix_encoder.")})
    return encoder().detach()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_thudm_state_dict_import(projection, tmp_path):
    state = thudm_state(projection)
    torch.save(state, tmp_path / "ref.bin")
    server = server_for(tiny_model("bert"))
    load_task(server, "ref", tmp_path / "ref.bin")
    load_task(server, "ref-dict", state)
    want = thudm_expected(state, projection)
    torch.testing.assert_close(server.task_prefix("ref"), want)
    torch.testing.assert_close(server.task_prefix("ref-dict"), want)


def test_thudm_mismatches_are_named():
    server = server_for(tiny_model("bert"))
    with pytest.raises(ValueError, match=r"flat width 2·L·hidden 192 != 128"):
        load_task(server, "x", thudm_state(False, layers=3))
    with pytest.raises(ValueError, match=r"missing \['trans.2.bias'\]"):
        state = thudm_state(True)
        del state["prefix_encoder.trans.2.bias"]
        load_task(server, "x", state)
    with pytest.raises(ValueError, match="embedding width"):
        load_task(server, "x", thudm_state(True, hidden=16))
    assert server.tasks() == []
