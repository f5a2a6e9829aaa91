"""A small JSON-over-HTTP front for :class:`~ptv2_kernels.serving.PrefixServer` on the standard library's
``ThreadingHTTPServer``: one thread per connection, every request handed to the engine's batcher, so
concurrent clients share mixed-task batches. (No FastAPI/uvicorn: they are not dependencies, and the
model forward, not the HTTP layer, bounds throughput.)

- ``GET /tasks``: ``{"tasks": [...], "output": ..., "prefix_len": P, "max_tasks": T, "max_length": n}``.
- ``GET /health``: ``{"status": "ok"}``.
- ``POST /predict`` with ``{"task": ..., "text": ...}`` (optional ``"text_pair"``) or ``{"task": ...,
  "input_ids": [...]}`` (optional ``"token_type_ids"``): ``{"task", "logits" | "embedding", "prediction"
  (classification: argmax), "num_tokens", "truncated"}``; 404 for an unknown task, 400 for a bad request.
  ``{"inputs": [<request>, ...]}`` answers ``{"outputs": [...]}`` with an ``{"error": ...}`` entry for
  each bad request while the others are served (status 200).
"""

import json
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import PrefixServer, Request, Result
from .heads import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

MAX_BODY_BYTES = 8 << 20
REQUEST_FIELDS = ("task", "text", "text_pair", "input_ids", "token_type_ids")


class _BadRequest(ValueError):
    pass


def _parse(entry) -> Request:
    if not isinstance(entry, dict):
        raise _BadRequest(f"a request must be a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(REQUEST_FIELDS))
    if unknown:
        raise _BadRequest(f"unknown fields {unknown}; a request has {list(REQUEST_FIELDS)}")
    if not isinstance(entry.get("task"), str):
        raise _BadRequest("'task' (a string) is required")
    for name in ("text", "text_pair"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise _BadRequest(f"'{name}' must be a string")
    for name in ("input_ids", "token_type_ids"):
        if entry.get(name) is not None and not isinstance(entry[name], list):
            raise _BadRequest(f"'{name}' must be a list of integers")
    return Request(**{name: entry.get(name) for name in REQUEST_FIELDS})


def result_json(engine: PrefixServer, result: Result) -> dict:
    """The JSON answer of one :class:`Result`."""
    if result.error is not None:
        return {"task": result.task, "error": result.error}
    out = {"task": result.task, engine.head.output_name: result.output.tolist(), "num_tokens": result.num_tokens,
           "truncated": result.truncated}
    if engine.head.kind in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION):
        out["prediction"] = result.output.argmax(-1).tolist()
    return out


class PrefixHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to one engine; ``timeout_s``: how long a request may wait for its batch."""

    daemon_threads = True

    def __init__(self, address, engine: PrefixServer, timeout_s: float = 60.0, verbose: bool = False):
        super().__init__(address, _Handler)
        self.engine, self.timeout_s, self.verbose = engine, timeout_s, verbose


class _Handler(BaseHTTPRequestHandler):
    server: PrefixHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        engine = self.server.engine
        if self.path == "/tasks":
            self._send(200, {"tasks": engine.tasks(), "output": engine.head.kind,
                             "prefix_len": engine.prefix_config.prefix_len,
                             "max_tasks": engine.prefix_config.num_tasks, "max_length": engine.max_length})
        elif self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": f"no such endpoint {self.path!r}; use GET /tasks, GET /health, POST /predict"})

    def do_POST(self):  # noqa: N802
        if self.path != "/predict":
            self._send(404, {"error": f"no such endpoint {self.path!r}; use POST /predict"})
            return
        try:
            body = self._json_body()
            batch = isinstance(body, dict) and "inputs" in body
            entries = body["inputs"] if batch else [body]
            if not isinstance(entries, list) or not entries:
                raise _BadRequest("'inputs' must be a non-empty list of requests")
        except _BadRequest as error:
            self._send(400, {"error": str(error)})
            return
        requests = []
        for entry in entries:
            try:
                requests.append(_parse(entry))
            except _BadRequest as error:
                requests.append(error)
        answers = self._answers(requests)
        if batch:
            self._send(200, {"outputs": answers})
        elif "error" in answers[0]:
            unknown = answers[0]["error"].startswith("unknown task")
            self._send(404 if unknown else 400, answers[0])
        else:
            self._send(200, answers[0])

    def _json_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _BadRequest(f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except ValueError as error:
            raise _BadRequest(f"the body is not valid JSON: {error}") from None

    def _answers(self, requests) -> list:
        """Submit every parsed request to the batcher and wait for all of them."""
        engine = self.server.engine
        futures = [r if isinstance(r, _BadRequest) else engine.submit(r) for r in requests]
        answers = []
        for future in futures:
            if isinstance(future, _BadRequest):
                answers.append({"error": str(future)})
                continue
            try:
                answers.append(result_json(engine, future.result(timeout=self.server.timeout_s)))
            except FutureTimeout:
                answers.append({"error": f"no result within {self.server.timeout_s} s (server overloaded)"})
            except Exception as error:  # noqa: BLE001  (a failed batch: report it, keep serving)
                answers.append({"error": f"inference failed: {type(error).__name__}: {error}"})
        return answers
