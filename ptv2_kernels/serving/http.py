"""The HTTP front of :class:`~ptv2_kernels.serving.PrefixServer`: FastAPI on uvicorn (the ``[serve]`` extra).

Endpoints (every answer, errors included, is JSON; the schema is at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/predict`` ``{"task"?: ..., "inputs": [{"task"?, "text"? , "text_pair"?, "input_ids"?,
  "token_type_ids"?}, ...]}`` (each input's task, else the request's: one request may mix tasks) →
  ``{"outputs": [{"task", "logits" | "embedding", "prediction" (classification), "num_tokens", "truncated"}]}``.
  A request is answered whole or refused whole: the first bad input decides the status, ``details`` lists all.
- ``GET /v1/tasks``: the tasks and the limits. Admin (an API key is required): ``POST /v1/tasks`` ``{"name",
  "source", "replace"?, "head"?}`` loads a ``save_prefix`` file, a PEFT adapter directory or a P-Tuning v2
  reference checkpoint (``name`` omitted: a bank directory) on the server's filesystem, all or nothing;
  ``DELETE /v1/tasks/{name}``.
- ``GET /health`` (the process answers), ``GET /ready`` (model loaded and warmed up; 503 while draining),
  ``GET /metrics`` (Prometheus text format).

Statuses: 400 malformed HTTP or JSON, 401 missing/wrong API key, 403 admin without keys configured or a source
outside ``task_root``, 404 unknown task or endpoint, 405 wrong method, 409 task exists / bank full, 413 body over
``max_body_bytes``, 422 invalid request (types, too
many inputs, ids outside the vocabulary, ``input_ids`` over ``max_length``; text is truncated instead, with
``truncated: true``), 429 queue full (``Retry-After``), 500 inference failed, 504 deadline (``timeout_s``) passed.
Errors are ``{"error": message, "code": code}`` (+ ``details``).

Concurrency: the handlers await :meth:`PrefixServer.predict_async` on uvicorn's event loop; the engine's batcher
thread runs the model, so concurrent clients share mixed-task batches.
"""

import hmac
import json
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

try:
    import uvicorn
    from fastapi import Depends, FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
    from starlette.exceptions import HTTPException
except ImportError as missing:  # pragma: no cover  (the optional extra is not installed)
    raise ImportError(f"ptv2_kernels.serving.http needs the [serve] extra (fastapi, uvicorn, prometheus-client): "
                      f"pip install 'ptv2_kernels[serve]' ({missing})") from missing

from ..errors import CheckpointError
from .checkpoints import BANK_INDEX, load_bank, load_task
from .engine import (DEADLINE_EXCEEDED, INFERENCE_FAILED, INVALID_INPUT, UNKNOWN_TASK, BatchStats, PrefixServer,
                     Request, Result, ServerOverloaded)
from .heads import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

STATUS_OF_CODE = {UNKNOWN_TASK: 404, INVALID_INPUT: 422, INFERENCE_FAILED: 500, DEADLINE_EXCEEDED: 504}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class HTTPSettings:
    """Limits and auth of the HTTP front.

    ``api_keys``: Bearer keys; empty: the predict and read endpoints are open and the admin endpoints refused
    (403). ``max_body_bytes``: request body limit (413). ``max_inputs``: inputs per request (422).
    ``timeout_s``: per-request deadline (504). ``task_root``: admin loads must name a path inside it (None: any
    path the server can read). ``warm_up``: one dummy forward before ``/ready`` turns 200."""

    api_keys: Tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_inputs: int = 64
    timeout_s: float = 30.0
    task_root: Optional[str] = None
    warm_up: bool = True


class APIError(Exception):
    """An error answer: ``status``, ``code`` and ``message`` (+ ``details``, ``headers``)."""

    def __init__(self, status: int, code: str, message: str, details=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    body = {"error": message, "code": code}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request and response models (the OpenAPI schema) --------------------------------------------------------
class PredictInput(BaseModel):
    """One input: ``text`` (optionally with ``text_pair``) or ``input_ids`` (special tokens included)."""

    model_config = ConfigDict(extra="forbid")
    task: Optional[StrictStr] = Field(None, min_length=1, description="this input's task (default: the request's)")
    text: Optional[StrictStr] = Field(None, description="text, tokenized by the server (truncated to max_length)")
    text_pair: Optional[StrictStr] = Field(None, description="second text of a pair (needs text)")
    input_ids: Optional[List[StrictInt]] = Field(None, description="token ids, special tokens included")
    token_type_ids: Optional[List[StrictInt]] = Field(None, description="one token type per input id")


class PredictOutput(BaseModel):
    task: str
    logits: Optional[Union[List[float], List[List[float]]]] = Field(
        None, description="classification: [num_labels], or [n, num_labels] per token")
    embedding: Optional[List[float]] = Field(None, description="bare base model: mean of the token states")
    prediction: Optional[Union[int, List[int]]] = Field(None, description="classification: argmax of logits")
    num_tokens: int
    truncated: bool


class PredictResponse(BaseModel):
    outputs: List[PredictOutput]


class ErrorResponse(BaseModel):
    error: str
    code: str
    details: Optional[list] = None


class LoadTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[StrictStr] = Field(None, min_length=1, max_length=200,
                                      description="the task's name; omitted: source is a bank directory")
    source: StrictStr = Field(min_length=1, description="a path on the server: save_prefix file, PEFT adapter "
                                                        "directory, P-Tuning v2 reference checkpoint or bank directory")
    replace: StrictBool = False
    head: StrictBool = Field(True, description="import the checkpoint's task head too, when it has one")


class TasksResponse(BaseModel):
    tasks: List[str]
    output: str
    prefix_len: int
    max_tasks: int
    max_length: int
    max_inputs: int
    packed: bool


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 500, 503, 504)}


def result_json(engine: PrefixServer, result: Result) -> dict:
    """The JSON answer of one served :class:`Result`."""
    out = {"task": result.task, engine.head.output_name: result.output.tolist(), "num_tokens": result.num_tokens,
           "truncated": result.truncated}
    if engine.head.kind in (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION):
        out["prediction"] = result.output.argmax(-1).tolist()
    return out


# ---- metrics ---------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app (its own registry): HTTP requests by endpoint and status, latency, queue
    depth, batch size and tokens per batch, rows served per task."""

    def __init__(self, engine: PrefixServer):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ptv2_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.latency = Histogram("ptv2_http_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Gauge("ptv2_queue_depth", "requests waiting for the batcher", registry=registry)
        self.queue.set_function(lambda: engine.queue_depth)
        self.batch_size = Histogram("ptv2_batch_size", "requests per batch", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_tokens = Histogram("ptv2_batch_tokens", "real tokens per batch", registry=registry,
                                      buckets=tuple(2 ** i for i in range(4, 16)))
        self.rows = Counter("ptv2_task_rows", "rows served per task", ["task"], registry=registry)
        engine.on_batch(self.observe_batch)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.rows)
        self.batch_tokens.observe(stats.tokens)
        for task in set(stats.tasks):
            self.rows.labels(task).inc(stats.tasks.count(task))


class _Middleware:
    """Pure ASGI, around the routes: the body size limit (413 before the app sees an oversized body) and the HTTP
    metrics."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, paths):
        self.app, self.metrics, self.max_body_bytes, self.paths = app, metrics, max_body_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.paths else "other")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _limited(self, scope, receive, send):
        """Read the whole body first (at most ``max_body_bytes``; FastAPI would read it anyway), then run the app
        on it; an oversized body (declared or streamed) is answered 413 without reaching the app."""
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(receive, send, int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(receive, send, size)
        replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return replayed.pop() if replayed else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, receive, send, size: int):
        """413 without reading the rest of the body (uvicorn reads and drops it after the answer, so the client
        finishes its upload and reads the answer instead of a broken pipe)."""
        response = error_response(413, "body_too_large", f"the request body ({size} bytes or more) is over the "
                                                         f"{self.max_body_bytes}-byte limit")
        await response({"type": "http"}, receive, send)


# ---- the app ---------------------------------------------------------------------------------------------------
def create_app(engine: PrefixServer, settings: HTTPSettings = HTTPSettings()) -> FastAPI:
    """The FastAPI app serving ``engine``. Its lifespan warms the engine up (then ``/ready`` answers 200) and
    closes it at shutdown, after the in-flight requests (uvicorn drains them first)."""
    if not isinstance(engine, PrefixServer):
        raise TypeError(f"engine must be a PrefixServer, got {type(engine).__name__}")
    if not isinstance(settings, HTTPSettings):
        raise TypeError(f"settings must be HTTPSettings, got {type(settings).__name__}")
    if settings.max_inputs > engine.max_queue:
        raise ValueError(f"settings.max_inputs={settings.max_inputs} must be <= the engine's max_queue="
                         f"{engine.max_queue} (a request's inputs are queued together)")
    keys = tuple(settings.api_keys)
    task_root = None if settings.task_root is None else Path(settings.task_root).resolve()

    @asynccontextmanager
    async def lifespan(app):
        if settings.warm_up:
            await run_in_threadpool(engine.warm_up)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await run_in_threadpool(engine.close)

    app = FastAPI(title="ptv2_kernels prefix server", version="1", lifespan=lifespan,
                  description="Many prefix-tuned (P-Tuning v2) tasks on one frozen backbone, mixed-task batches.")
    app.state.ready, app.state.draining = False, False
    bearer = HTTPBearer(auto_error=False, description="an API key of the server (--api-key / PTV2_API_KEYS)")

    def check_key(credentials: Optional[HTTPAuthorizationCredentials]) -> None:
        token = "" if credentials is None else credentials.credentials
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
            raise APIError(401, "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if keys:
            check_key(credentials)

    def authorize_admin(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if not keys:
            raise APIError(403, "admin_disabled", "admin endpoints need API keys: start the server with --api-key "
                                                  "(or PTV2_API_KEYS)")
        check_key(credentials)

    def queue_full(error: ServerOverloaded) -> APIError:
        return APIError(429, "overloaded", str(error), headers={"Retry-After": str(max(1, math.ceil(
            error.retry_after_s)))})

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: Optional[StrictStr] = Field(None, min_length=1, description="the task of inputs that name none")
        inputs: List[PredictInput] = Field(min_length=1, max_length=settings.max_inputs)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, dependencies=[Depends(authorize)],
              summary="Outputs of one or many inputs, any tasks mixed")
    async def predict(body: PredictRequest):
        requests = []
        for index, entry in enumerate(body.inputs):
            task = entry.task or body.task
            if task is None:
                raise APIError(422, "invalid_request", f"inputs[{index}] has no task: set inputs[{index}].task or "
                                                       "the request's task")
            try:
                requests.append(Request(task, text=entry.text, text_pair=entry.text_pair, input_ids=entry.input_ids,
                                        token_type_ids=entry.token_type_ids))
            except (TypeError, ValueError) as error:
                raise APIError(422, "invalid_request", f"inputs[{index}]: {error}") from None
        try:
            results = await engine.predict_async(requests, timeout_s=settings.timeout_s)
        except ServerOverloaded as error:
            raise queue_full(error) from None
        except TimeoutError:
            raise APIError(504, DEADLINE_EXCEEDED, f"no result within {settings.timeout_s} s (server busy)") from None
        failed = [(i, r) for i, r in enumerate(results) if r.error is not None]
        if failed:
            index, first = failed[0]
            raise APIError(STATUS_OF_CODE.get(first.code, 500), first.code, f"inputs[{index}]: {first.error}",
                           details=[{"input": i, "code": r.code, "error": r.error} for i, r in failed])
        body_json = json.dumps({"outputs": [result_json(engine, r) for r in results]})
        return Response(body_json, media_type="application/json")

    @app.get("/v1/tasks", response_model=TasksResponse, responses=ERRORS, dependencies=[Depends(authorize)],
             summary="The served tasks and the limits")
    async def tasks():
        return TasksResponse(tasks=engine.tasks(), output=engine.head.kind, prefix_len=engine.prefix_config.prefix_len,
                             max_tasks=engine.prefix_config.num_tasks, max_length=engine.max_length,
                             max_inputs=settings.max_inputs, packed=engine.packed)

    @app.post("/v1/tasks", status_code=201, responses=ERRORS, dependencies=[Depends(authorize_admin)],
              summary="Admin: load a task (or a bank directory) from the server's filesystem, all or nothing")
    async def add_task(body: LoadTask):
        source = Path(body.source).expanduser().resolve()
        if task_root is not None and task_root != source and task_root not in source.parents:
            raise APIError(403, "forbidden_path", f"source must lie inside the task root {task_root}")
        try:
            if body.name is None:
                if not (source / BANK_INDEX).exists():
                    raise APIError(422, "invalid_request", f"without a name, source must be a bank directory "
                                                           f"({BANK_INDEX}); {source} is not")
                await run_in_threadpool(load_bank, engine, source, replace=body.replace)
            else:
                await run_in_threadpool(load_task, engine, body.name, source, replace=body.replace, head=body.head)
        except CheckpointError as error:
            raise APIError(422, "invalid_checkpoint", str(error)) from None
        except (ValueError, RuntimeError) as error:  # name taken, bank full
            raise APIError(409, "conflict", str(error)) from None
        return {"tasks": engine.tasks()}

    @app.delete("/v1/tasks/{name}", responses=ERRORS, dependencies=[Depends(authorize_admin)],
                summary="Admin: stop serving a task and free its slot")
    async def remove_task(name: str):
        try:
            await run_in_threadpool(engine.remove_task, name)
        except KeyError as error:
            raise APIError(404, UNKNOWN_TASK, error.args[0]) from None
        return {"removed": name, "tasks": engine.tasks()}

    @app.get("/health", summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses=ERRORS, summary="Readiness: model loaded and warmed up, not draining")
    async def ready():
        if app.state.draining:
            raise APIError(503, "draining", "the server is shutting down")
        if not app.state.ready:
            raise APIError(503, "starting", "the model is warming up")
        return {"status": "ready", "tasks": len(engine.tasks())}

    metrics = Metrics(engine)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error.status, error.code, error.message, error.details, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        message = error.detail
        if error.status_code == 404:
            message = f"no such endpoint {request.url.path!r}; see /docs"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path!r}; see /docs"
        return error_response(error.status_code, f"http_{error.status_code}", str(message),
                              headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        problems = [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"],
                     "type": e["type"]} for e in error.errors()]
        if any(p["type"] == "json_invalid" for p in problems):
            return error_response(400, "invalid_json", f"the body is not valid JSON: {problems[0]['message']}")
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        return error_response(422, "invalid_request", f"invalid request: {summary}", details=problems)

    @app.exception_handler(Exception)
    async def internal(request, error: Exception):
        return error_response(500, "internal", f"internal error: {type(error).__name__}: {error}")

    paths = {route.path for route in app.routes}
    app.add_middleware(_Middleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, paths=paths)
    return app


# ---- running it ------------------------------------------------------------------------------------------------
def json_400_protocol():
    """uvicorn's HTTP protocol (httptools, else h11) answering malformed HTTP (a bad Content-Length, a broken
    request line) with a JSON 400 instead of its plain-text one."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover  (httptools is optional)
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    if not callable(getattr(base, "send_400_response", None)):
        raise RuntimeError(f"uvicorn {uvicorn.__version__}: {base.__name__}.send_400_response is gone; this version "
                           "of uvicorn is not supported")

    class JSON400Protocol(base):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"malformed HTTP request: {msg}", "code": "bad_http_request"}).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
            self.transport.close()

    return JSON400Protocol


class HTTPServer(uvicorn.Server):
    """uvicorn's server for one of our apps: SIGTERM/SIGINT (or :meth:`stop`) first turns ``/ready`` to 503
    (draining), then uvicorn stops accepting, answers the in-flight requests and runs the app's shutdown (the
    engine drains its queue). ``on_started(host, port)`` runs once the port is bound."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, timeout_s: float = 30.0,
                 log_level: str = "warning", access_log: bool = False, on_started=None):
        config = uvicorn.Config(app, host=host, port=port, http=json_400_protocol(), lifespan="on",
                                log_level=log_level, access_log=access_log, backlog=2048,
                                timeout_graceful_shutdown=timeout_s + 10, timeout_keep_alive=30)
        super().__init__(config)
        self.app, self.on_started, self.address = app, on_started, None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            self.address = self.servers[0].sockets[0].getsockname()[:2]
            if self.on_started is not None:
                self.on_started(*self.address)

    def handle_exit(self, sig, frame) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """Graceful shutdown from another thread (what SIGTERM does)."""
        self.app.state.draining = True
        self.should_exit = True
