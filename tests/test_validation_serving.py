"""Input contract of the serving surface, table-driven (CPU, tiny random BERT): every bad argument of ``Request``
and ``PrefixServer`` raises TypeError/ValueError naming it; every bad checkpoint raises ``CheckpointError`` naming
the file (and the ``tasks.json`` field) and leaves the server exactly as before (tasks, slots, heads, bank,
outputs); a malformed request fails alone, on submit or inside a batch."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import json
import shutil

import pytest
import torch

from ptv2_kernels.errors import CheckpointError
from ptv2_kernels.patching.base import STATE_ATTR
from ptv2_kernels.serving import PrefixServer, Request
from ptv2_kernels.serving.checkpoints import load_bank, load_task, save_bank
from ptv2_kernels.serving.engine import INFERENCE_FAILED, INVALID_INPUT, UNKNOWN_TASK

from .test_patch_bert import PREFIX_LEN, tiny_model
from .test_serving import TOL, make_server, random_requests

# ---- Request ---------------------------------------------------------------------------------------------------
REQUESTS = [
    (dict(task=5, text="x"), TypeError, "Request.task"),
    (dict(task="", text="x"), ValueError, "Request.task"),
    (dict(task="t", text=12345), TypeError, "Request.text"),
    (dict(task="t", text=b"bytes"), TypeError, "Request.text"),
    (dict(task="t", text="a", text_pair=3), TypeError, "Request.text_pair"),
    (dict(task="t", input_ids="abc"), TypeError, "Request.input_ids"),
    (dict(task="t", input_ids=[1, 2.5]), TypeError, "Request.input_ids"),
    (dict(task="t", input_ids=[True, 3]), TypeError, "Request.input_ids"),
    (dict(task="t", input_ids=torch.tensor([1.0, 2.0])), TypeError, "Request.input_ids"),
    (dict(task="t", input_ids=torch.tensor([[1, 2]])), TypeError, "Request.input_ids"),
    (dict(task="t"), ValueError, "exactly one of text and input_ids"),
    (dict(task="t", text="a", input_ids=[1]), ValueError, "exactly one of text and input_ids"),
    (dict(task="t", input_ids=[1, 2], token_type_ids=[0]), ValueError, "Request.token_type_ids"),
    (dict(task="t", input_ids=[1, 2], token_type_ids=[0, "1"]), TypeError, "Request.token_type_ids"),
    (dict(task="t", input_ids=[1], text_pair="b"), ValueError, "Request.text_pair"),
]


@pytest.mark.parametrize("fields,error,match", REQUESTS, ids=[m + f"-{i}" for i, (_, _, m) in enumerate(REQUESTS)])
def test_bad_request_fields(fields, error, match):
    with pytest.raises(error, match=match):
        Request(**fields)


# ---- PrefixServer ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    server, _ = make_server("bert", "ForSequenceClassification", packed=True, tasks=2)
    yield server
    server.close()


def snapshot(server):
    """Everything a failed call must leave as it was: tasks, slots, heads, the bank and the outputs."""
    requests = random_requests(server.tasks(), count=4, seed=21)
    heads = {name: None if head is None else {k: v.clone() for k, v in head.items()}
             for name, head in server._heads.items()}
    return (server.tasks(), dict(server._slots), heads, server.encoder.prefix.clone(),
            [r.output for r in server.predict(requests)])


def assert_unchanged(before, after):
    assert before[:2] == after[:2]
    assert before[2].keys() == after[2].keys()
    for a, b in zip(before[2].values(), after[2].values()):
        assert (a is None) == (b is None) and (a is None or all(torch.equal(a[k], b[k]) for k in a))
    assert torch.equal(before[3], after[3])
    for a, b in zip(before[4], after[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _prefix(server, **change):
    shape = list(server.prefix_shape)
    for axis, size in change.items():
        shape[int(axis[1:])] = size
    return torch.randn(shape)


METHODS = [
    (lambda s: s.predict("some text"), TypeError, "requests"),
    (lambda s: s.predict(Request("task0", input_ids=[3])), TypeError, "requests"),
    (lambda s: s.predict([Request("task0", input_ids=[3]), "x"]), TypeError, "requests"),
    (lambda s: s.predict({"task": "task0"}), TypeError, "requests"),
    (lambda s: s.submit("x"), TypeError, "request"),
    (lambda s: s.submit(Request("task0", input_ids=[3]), timeout_s=-1), ValueError, "timeout_s"),
    (lambda s: s.submit(Request("task0", input_ids=[3]), timeout_s="1"), TypeError, "timeout_s"),
    (lambda s: s.add_task(5, _prefix(s)), TypeError, "name"),
    (lambda s: s.add_task("", _prefix(s)), ValueError, "name"),
    (lambda s: s.add_task("new", _prefix(s).long()), TypeError, "prefix of task 'new'.*floating-point"),
    (lambda s: s.add_task("new", _prefix(s).tolist()), TypeError, "prefix of task 'new'"),
    (lambda s: s.add_task("new", _prefix(s, d3=PREFIX_LEN + 1)), ValueError, "prefix_len P 5 != 4"),
    (lambda s: s.add_task("new", _prefix(s, d2=3)), ValueError, "heads H 3 != 2"),
    (lambda s: s.add_task("new", _prefix(s)[0]), ValueError, "wrong number of dimensions"),
    (lambda s: s.add_task("new", _prefix(s) * float("inf")), ValueError, "NaN or infinite"),
    (lambda s: s.add_task("new", _prefix(s), head=[1, 2]), TypeError, "head of task 'new'"),
    (lambda s: s.add_task("new", _prefix(s), head={"weight": [1.0]}), TypeError, "head of task 'new': 'weight'"),
    (lambda s: s.add_task("new", _prefix(s), head={"weight": torch.zeros(2, 32)}), ValueError, r"missing \['bias'\]"),
    (lambda s: s.add_task("new", _prefix(s), replace="yes"), TypeError, "replace"),
    (lambda s: s.add_task("task0", _prefix(s)), ValueError, "already exist"),
    (lambda s: s.add_tasks([("new", _prefix(s))]), TypeError, "tasks must be a dict"),
    (lambda s: s.add_tasks({"new": _prefix(s)}), TypeError, r"tasks\['new'\]"),
    (lambda s: s.add_tasks({"a": (_prefix(s), None), "b": (_prefix(s, d4=8), None)}), ValueError, "task 'b'"),
    (lambda s: s.add_tasks({f"t{i}": (_prefix(s), None) for i in range(3)}), RuntimeError, "bank is full"),
    (lambda s: s.remove_task(3), TypeError, "name"),
    (lambda s: s.remove_task("missing"), KeyError, "unknown task 'missing'"),
    (lambda s: s.task_prefix("missing"), KeyError, "unknown task 'missing'"),
    (lambda s: s.task_head(None), TypeError, "name"),
    (lambda s: s.on_batch(5), TypeError, "callback"),
]


@pytest.mark.parametrize("call,error,match", METHODS, ids=[f"{i}-{m[:24]}" for i, (_, _, m) in enumerate(METHODS)])
def test_bad_method_arguments_change_nothing(server, call, error, match):
    before = snapshot(server)
    with pytest.raises(error, match=match):
        call(server)
    assert_unchanged(before, snapshot(server))


CONSTRUCTOR = [
    (dict(prefix_len="4"), TypeError, "prefix_len"),
    (dict(prefix_len=0), ValueError, "prefix_len"),
    (dict(max_tasks=1), ValueError, "max_tasks"),
    (dict(max_batch_tokens=2.5), TypeError, "max_batch_tokens"),
    (dict(max_batch_size=0), ValueError, "max_batch_size"),
    (dict(max_wait_ms=-1), ValueError, "max_wait_ms"),
    (dict(max_wait_ms=float("nan")), ValueError, "max_wait_ms"),
    (dict(max_queue=0), ValueError, "max_queue"),
    (dict(packed="yes"), TypeError, "packed"),
    (dict(tokenizer="bert-base-uncased"), TypeError, "tokenizer"),
]


@pytest.mark.parametrize("options,error,match", CONSTRUCTOR, ids=[m for _, _, m in CONSTRUCTOR])
def test_bad_constructor_arguments_leave_the_model_unpatched(options, error, match):
    model = tiny_model("bert")
    options = {"prefix_len": PREFIX_LEN, **options}
    with pytest.raises(error, match=match):
        PrefixServer(model, options.pop("prefix_len"), **options)
    assert not hasattr(model, STATE_ATTR)
    with pytest.raises(TypeError, match="model must be a transformers model"):
        PrefixServer("bert-base-uncased", PREFIX_LEN)


# ---- loads -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank(tmp_path_factory, server):
    """A good bank directory of the server's tasks (task0 with its own classifier) to break in copies."""
    directory = tmp_path_factory.mktemp("bank")
    torch.manual_seed(4)
    head = {k: torch.randn_like(v) for k, v in server.head.module.state_dict().items()}
    source, _ = make_server("bert", "ForSequenceClassification", packed=True, tasks=2)
    source.add_task("task0", source.task_prefix("task0"), head, replace=True)
    save_bank(source, directory)
    return directory


def _broken_bank(bank, tmp_path, index=None, files=None):
    """A copy of ``bank`` with ``index(dict) -> dict`` applied to tasks.json and ``files`` {name: bytes} written."""
    directory = tmp_path / "broken"
    shutil.copytree(bank, directory)
    if index is not None:
        path = directory / "tasks.json"
        path.write_text(json.dumps(index(json.loads(path.read_text()))))
    for name, data in (files or {}).items():
        (directory / name).write_bytes(data)
    return directory


def _entry(field, value=None, drop=False):
    def edit(index):
        if drop:
            del index["tasks"][1][field]
        else:
            index["tasks"][1][field] = value
        return index
    return edit


def _peft_dir(tmp_path, config_text):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(config_text)
    return directory


def _truncated(bank, name):
    data = (bank / name).read_bytes()
    return data[:len(data) // 2]


def _saved(tmp_path, value, name="state.bin"):
    torch.save(value, tmp_path / name)
    return tmp_path / name


LOADS = [  # (make the source from (bank, tmp_path), loader, what the message must name)
    (lambda b, t: _peft_dir(t, "[1, 2, 3]"), "task", r"adapter_config\.json must hold a JSON object.*got a JSON list"),
    (lambda b, t: _peft_dir(t, "{not json"), "task", r"cannot read .*adapter_config\.json"),
    (lambda b, t: _broken_bank(b, t, _entry("prefix", drop=True)), "bank", r"tasks\.json tasks\[1\] has no 'prefix'"),
    (lambda b, t: _broken_bank(b, t, _entry("name", drop=True)), "bank", r"tasks\.json tasks\[1\] has no 'name'"),
    (lambda b, t: _broken_bank(b, t, _entry("name", 7)), "bank", r"tasks\[1\]: 'name' must be a non-empty string"),
    (lambda b, t: _broken_bank(b, t, _entry("head", "")), "bank", r"tasks\[1\]: 'head' must be a non-empty string"),
    (lambda b, t: _broken_bank(b, t, _entry("prefix", "../outside.safetensors")), "bank", "inside the bank directory"),
    (lambda b, t: _broken_bank(b, t, _entry("colour", "red")), "bank", r"tasks\[1\] has unknown fields \['colour'\]"),
    (lambda b, t: _broken_bank(b, t, lambda i: {**i, "tasks": {"a": 1}}), "bank", "'tasks' must be a list"),
    (lambda b, t: _broken_bank(b, t, lambda i: {**i, "tasks": [i["tasks"][0], 3]}), "bank",
     r"tasks\[1\] must be an object"),
    (lambda b, t: _broken_bank(b, t, lambda i: {**i, "tasks": i["tasks"] * 2}), "bank", "lists task 'task0' twice"),
    (lambda b, t: _broken_bank(b, t, lambda i: {**i, "version": 2}), "bank", "not a ptv2-prefix-bank version 1"),
    (lambda b, t: _broken_bank(b, t, files={"tasks.json": b"{garbage"}), "bank", r"tasks\.json is not valid JSON"),
    (lambda b, t: _broken_bank(b, t, files={"task-001.safetensors": _truncated(b, "task-001.safetensors")}), "bank",
     r"task-001\.safetensors"),
    (lambda b, t: _broken_bank(b, t, files={"task-000.head.safetensors": b"\x00" * 64}), "bank",
     r"task-000\.head\.safetensors"),
    (lambda b, t: _broken_bank(b, t, files={"task-000.head.safetensors": (b / "task-000.safetensors").read_bytes()}),
     "bank", r"task-000\.head\.safetensors: .*missing \['bias', 'weight'\]"),
    (lambda b, t: b / "task-001.safetensors", "truncated-file", r"task-001\.safetensors"),
    (lambda b, t: _saved(t, "not a state dict"), "task", r"state\.bin is not a state dict"),
    (lambda b, t: _saved(t, [torch.zeros(3)]), "task", r"state\.bin is not a state dict"),
    (lambda b, t: _saved(t, {"embedding.weight": torch.zeros(4, 128, dtype=torch.long)}), "task", "floating-point"),
    (lambda b, t: _saved(t, {"embedding.weight": torch.zeros(5, 128)}), "task", r"prefix_len 5 != 4"),
    (lambda b, t: (t / "garbage.bin").write_bytes(b"garbage") and t / "garbage.bin", "task", r"garbage\.bin"),
    (lambda b, t: t / "missing.safetensors", "task", r"no task checkpoint at .*missing\.safetensors"),
    (lambda b, t: t, "task", "a directory without adapter_config.json or tasks.json"),
    (lambda b, t: b, "task", "is a bank of tasks; load it with load_bank"),
]


@pytest.mark.parametrize("make,loader,match", LOADS, ids=[f"{i}-{loader}" for i, (_, loader, _) in enumerate(LOADS)])
def test_bad_checkpoints_raise_checkpoint_error_and_load_nothing(server, bank, tmp_path, make, loader, match):
    source = make(bank, tmp_path)
    if loader == "truncated-file":  # a truncated copy of one task file
        (tmp_path / source.name).write_bytes(_truncated(bank, source.name))
        source = tmp_path / source.name
    before = snapshot(server)
    with pytest.raises(CheckpointError, match=match):
        if loader == "bank":
            load_bank(server, source, replace=True)
        else:
            load_task(server, "new", source)
    assert_unchanged(before, snapshot(server))


def test_good_bank_still_loads(server, bank):
    """The fixture bank itself is fine (the failures above come from the breakage), and loads whole."""
    fresh, _ = make_server("bert", "ForSequenceClassification", packed=True, tasks=0)
    assert load_bank(fresh, bank) == ["task0", "task1"] and fresh.task_head("task0") is not None


@pytest.mark.parametrize("call,error,match", [
    (lambda s: load_task(s, "new", 123), TypeError, "source"),
    (lambda s: load_task(s, "new", {"embedding.weight": torch.zeros(4, 128)}, head="yes"), TypeError, "head"),
    (lambda s: load_task(s, 5, {"embedding.weight": torch.zeros(4, 128)}), TypeError, "name"),
    (lambda s: load_task("server", "new", {"embedding.weight": torch.zeros(4, 128)}), TypeError, "server"),
    (lambda s: load_bank(s, 3), TypeError, "directory"),
    (lambda s: save_bank(s, None), TypeError, "directory"),
])
def test_bad_load_arguments(server, call, error, match):
    before = snapshot(server)
    with pytest.raises(error, match=match):
        call(server)
    assert_unchanged(before, snapshot(server))


# ---- request isolation -----------------------------------------------------------------------------------------
POISON = 63  # a valid token id that this test's forward refuses, standing in for a kernel failure on one row


def test_a_request_that_fails_inside_a_batch_fails_alone(monkeypatch):
    server, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=200)
    requests = random_requests(server.tasks(), count=12, seed=22, vocab=POISON)
    expected = server.predict(requests)
    forward = server._forward

    def poisoned(items, task_ids):
        if any(POISON in item.ids for item in items):
            raise RuntimeError("device-side failure")
        return forward(items, task_ids)

    monkeypatch.setattr(server, "_forward", poisoned)
    bad = [Request("task1", input_ids=[3, POISON, 4]), Request("missing", input_ids=[3]),
           Request("task0", input_ids=[3, 999])]
    try:
        futures = [server.submit(r) for r in requests[:6] + bad + requests[6:]]
        results = [f.result(timeout=60) for f in futures]
    finally:
        server.close()
    served = results[:6] + results[9:]
    for result, want in zip(served, expected):
        assert result.error is None
        torch.testing.assert_close(result.output, want.output, **TOL)
    assert [r.code for r in results[6:9]] == [INFERENCE_FAILED, UNKNOWN_TASK, INVALID_INPUT]
    assert "device-side failure" in results[6].error


def test_a_text_that_breaks_the_tokenizer_fails_alone():
    class Tokenizer:
        model_max_length = 16

        def __call__(self, texts, pairs=None, truncation=False, max_length=None):
            if any("\ufffd" in t for t in texts):
                raise ValueError("cannot tokenize U+FFFD")
            return {"input_ids": [[2] + [3 + len(w) % 50 for w in t.split()] + [2] for t in texts]}

    model = tiny_model("bert")
    server = PrefixServer(model, PREFIX_LEN, tokenizer=Tokenizer(), max_tasks=2)
    server.add_task("t", torch.randn(server.prefix_shape))
    good, bad = server.predict([Request("t", text="a fine sentence"), Request("t", text="broken \ufffd")])
    assert good.error is None and good.num_tokens == 5
    assert bad.code == INVALID_INPUT and "cannot tokenize" in bad.error
    alone = server.predict([Request("t", input_ids=[2, 4, 7, 11, 2])])[0]
    torch.testing.assert_close(good.output, alone.output)


def test_bad_requests_are_answered_on_submit_without_queueing():
    """Validation on submit: a bad request never reaches the batcher (its future is done at once, nothing queued),
    while a good one waits for its batch (max_wait_ms)."""
    server, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=2000)
    try:
        bad = [server.submit(Request("missing", input_ids=[3])), server.submit(Request("task0", input_ids=[3, 999])),
               server.submit(Request("task0", input_ids=list(range(2, 3 + server.max_length)))),
               server.submit(Request("task0", text="no tokenizer"))]
        assert all(f.done() for f in bad) and server.queue_depth == 0
        assert [f.result().code for f in bad] == [UNKNOWN_TASK, INVALID_INPUT, INVALID_INPUT, INVALID_INPUT]
        good = server.submit(Request("task0", input_ids=[3, 4]))
        assert not good.done() and server.queue_depth == 1
        torch.testing.assert_close(good.result(timeout=60).output,
                                   server.predict([Request("task0", input_ids=[3, 4])])[0].output, **TOL)
    finally:
        server.close()
