"""The HTTP front of :class:`~ptv2_kernels.serving.PrefixServer`: FastAPI on uvicorn (the ``[serve]`` extra).

Endpoints (every answer, errors included, is JSON; the schema is at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/predict`` ``{"task"?: ..., "inputs": [{"task"?, "text"? , "text_pair"?, "input_ids"?,
  "token_type_ids"?}, ...]}`` (each input's task, else the request's: one request may mix tasks) →
  ``{"outputs": [{"task", "logits" | "embedding", "prediction" (classification), "num_tokens", "truncated"}]}``.
  A request is answered whole or refused whole, and nothing of a refused one runs: every input is checked in one
  pass (a non-object entry, a field of the wrong type, no task, an unknown task, ids outside the vocabulary, ...);
  the first bad input decides the status, ``details`` names every bad one in order.
- ``GET /v1/tasks``: the tasks and the limits. Admin (an API key is required): ``POST /v1/tasks`` ``{"name",
  "source", "replace"?, "head"?}`` loads a ``save_prefix`` file, a PEFT adapter directory or a P-Tuning v2
  reference checkpoint (``name`` omitted: a bank directory) on the server's filesystem, all or nothing;
  ``DELETE /v1/tasks/{name}``.
- ``GET /health`` (the process answers), ``GET /ready`` (model loaded and warmed up; 503 while draining),
  ``GET /metrics`` (Prometheus text format).

Statuses: 400 malformed HTTP or JSON, 401 missing/wrong API key, 403 admin without keys configured or a source
outside ``task_root``, 404 unknown task or endpoint, 405 wrong method, 409 task exists / bank full, 413 body over
``max_body_bytes`` (answered before the rest of the body is read, which is then read and dropped, so that
clients that upload everything before reading get the answer), 422 invalid request (types, too many inputs, ids
outside the vocabulary, ``input_ids`` over ``max_length``; text is truncated instead, with ``truncated: true``),
429 queue full (``Retry-After``), 500 inference failed, 504 deadline (``timeout_s``) passed. Errors are
``{"error": message, "code": code}`` (+ ``details``).

Concurrency: the handlers await :meth:`PrefixServer.predict_async` on uvicorn's event loop; the engine's batcher
thread runs the model, so concurrent clients share mixed-task batches. A client that disconnects before its answer
cancels its handler, and its queued inputs leave the engine's queue unrun.
"""

import asyncio
import contextlib
import hmac
import json
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

try:
    import uvicorn
    from fastapi import Body, Depends, FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as missing:  # pragma: no cover  (the optional extra is not installed)
    raise ImportError(f"ptv2_kernels.serving.http needs the [serve] extra (fastapi, uvicorn, prometheus-client): "
                      f"pip install 'ptv2_kernels[serve]' ({missing})") from missing

from ..errors import CheckpointError
from .checkpoints import BANK_INDEX, load_bank, load_task
from .engine import (DEADLINE_EXCEEDED, INFERENCE_FAILED, INVALID_INPUT, UNKNOWN_TASK, BatchStats, PrefixServer,
                     Request, RequestsRefused, Result, ServerOverloaded, unknown_task_message)
from .heads import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

INVALID_REQUEST = "invalid_request"  # the HTTP request itself (JSON types, fields, no task): 422
STATUS_OF_CODE = {UNKNOWN_TASK: 404, INVALID_INPUT: 422, INVALID_REQUEST: 422, INFERENCE_FAILED: 500,
                  DEADLINE_EXCEEDED: 504}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class HTTPSettings:
    """Limits and auth of the HTTP front.

    ``api_keys``: Bearer keys; empty: the predict and read endpoints are open and the admin endpoints refused
    (403). ``max_body_bytes``: request body limit (413). ``drain_bytes``, ``drain_timeout_s``: after a 413, how
    much of the rest of the body is read and dropped, for how long at most, before the connection closes (a
    client that sends its whole body before reading gets the answer, not a reset, within these bounds).
    ``max_inputs``: inputs per request (422). ``timeout_s``: per-request deadline (504). ``task_root``: admin
    loads must name a path inside it (None: any path the server can read). ``warm_up``: one dummy forward before
    ``/ready`` turns 200."""

    api_keys: Tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    drain_bytes: int = 64 << 20
    drain_timeout_s: float = 30.0
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


def validation_problems(errors) -> List[dict]:
    """pydantic's errors as ``{"field", "message", "type"}``, fields dotted (``inputs.2.text``)."""
    return [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"],
             "type": e["type"]} for e in errors]


def invalid_request(problems: List[dict]) -> APIError:
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
    return APIError(422, INVALID_REQUEST, f"invalid request: {summary}", details=problems)


def read_input(entry, default_task: Optional[str], known: List[str]) -> Union[Request, Tuple[str, str]]:
    """One entry of ``inputs`` as a :class:`Request`, or ``(code, message)`` of its first problem, checked in this
    order: a JSON object of the documented fields and types, a task (its own or the request's), a served task,
    a valid combination of fields. The server's checks (vocabulary, length, tokenizer) come after."""
    if not isinstance(entry, dict):
        return INVALID_REQUEST, f"an input must be a JSON object, got {_preview(entry)}"
    try:
        fields = PredictInput.model_validate(entry)
    except ValidationError as error:
        return INVALID_REQUEST, "; ".join(f"{p['field']}: {p['message']}" for p in validation_problems(error.errors()))
    task = fields.task or default_task
    if task is None:
        return INVALID_REQUEST, "no task: set this input's task or the request's task"
    if task not in known:
        return UNKNOWN_TASK, unknown_task_message(task, known)
    try:
        return Request(task, text=fields.text, text_pair=fields.text_pair, input_ids=fields.input_ids,
                       token_type_ids=fields.token_type_ids)
    except (TypeError, ValueError) as error:
        return INVALID_REQUEST, str(error)


def _preview(value) -> str:
    """The start of ``value`` as JSON (its type if it is not JSON), for error messages."""
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return type(value).__name__


# ---- metrics ---------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app (its own registry): HTTP requests by endpoint and status, latency, queue
    depth, inputs dropped unrun because their client left, batch size and tokens per batch, rows served per task."""

    def __init__(self, engine: PrefixServer):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ptv2_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.latency = Histogram("ptv2_http_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Gauge("ptv2_queue_depth", "requests waiting for the batcher", registry=registry)
        self.queue.set_function(lambda: engine.queue_depth)
        registry.register(_EngineCounter("ptv2_requests_cancelled", "queued inputs dropped unrun because their client "
                                         "disconnected (or stopped waiting)", lambda: engine.cancelled_requests))
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


class _EngineCounter:
    """A Prometheus counter whose value the engine keeps (a custom collector)."""

    def __init__(self, name: str, documentation: str, value):
        self.name, self.documentation, self.value = name, documentation, value

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.value())


class _Middleware:
    """Pure ASGI, around the routes: the body size limit (413 before the app sees an oversized body), dropping the
    work of clients that leave before their answer, and the HTTP metrics (status ``499``: the client left)."""

    def __init__(self, app, metrics: Metrics, settings: HTTPSettings, paths):
        self.app, self.metrics, self.settings, self.paths = app, metrics, settings, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, counted, raised = time.perf_counter(), [], [], True

        def count(answered: str):
            """The request's metrics, once: when its answer ends, or when it ends unanswered."""
            if counted:
                return
            counted.append(answered)
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.paths else "other")
            self.metrics.requests.labels(endpoint, answered).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count(str(status[0]))  # before the client can read its answer's end (and ask /metrics next)
            await send(message)

        try:
            await self._limited(scope, receive, send_status, status)
            raised = False
        finally:
            count(str(status[0]) if status else "500" if raised else "499")

    async def _limited(self, scope, receive, send, started):
        """Read the whole body first (at most ``max_body_bytes``; FastAPI would read it anyway), then run the app
        on it; an oversized body (declared or streamed) is answered 413 without reaching the app."""
        limit = self.settings.max_body_bytes
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and declared > limit:
            return await self._too_large(headers, receive, send, declared, declared)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(headers, receive, send, size, declared, more)
        await self._unless_client_leaves(scope, b"".join(chunks), receive, send, started)

    async def _unless_client_leaves(self, scope, body: bytes, receive, send, started):
        """Run the app on the read ``body`` while watching the connection: if the client disconnects before the
        answer starts, the app's task is cancelled (an awaited ``predict_async`` then takes its inputs out of the
        engine's queue)."""
        replayed = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.ensure_future(_disconnected(receive))

        async def replay():  # the body, then the connection's end (the watcher is the one reading it)
            return replayed.pop() if replayed else await asyncio.shield(gone)

        app = asyncio.ensure_future(self.app(scope, replay, send))
        try:
            await asyncio.wait((app, gone), return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and not started:  # the client left before its answer
                app.cancel()
            await asyncio.wait((app,))
        finally:
            gone.cancel()
            app.cancel()  # a no-op unless this middleware itself is cancelled
        if not app.cancelled():
            app.result()  # the app's exception, if it raised

    async def _too_large(self, headers, receive, send, size: int, declared: Optional[int], more: bool = True):
        """413, sent at once (a client that reads while it uploads stops early), then the rest of the body read and
        dropped (at most ``drain_bytes``, for ``drain_timeout_s``) before the connection closes: closing a
        socket with unread data sends a reset, which destroys the answer in a client that uploads everything
        before it reads (urllib). Nothing to drain when the client waits for ``100 Continue`` (it sent no body)
        or declared more than the drain cap (it would be reset anyway)."""
        response = error_response(413, "body_too_large", f"the request body ({size} bytes or more) is over the "
                                                         f"{self.settings.max_body_bytes}-byte limit",
                                  headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        waits = headers.get(b"expect", b"").lower() == b"100-continue"
        if more and not waits and (declared or 0) <= self.settings.drain_bytes:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(receive, self.settings.drain_bytes), self.settings.drain_timeout_s)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive, limit: int) -> None:
    """Read and drop the rest of a request body, at most ``limit`` bytes."""
    while limit >= 0:
        message = await receive()
        limit -= len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _disconnected(receive) -> dict:
    """Wait for the client's disconnect (uvicorn also says so once the answer is complete); the message."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message


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

    class PredictRequest(BaseModel):  # the documented body (/openapi.json)
        model_config = ConfigDict(extra="forbid")
        task: Optional[StrictStr] = Field(None, min_length=1, description="the task of inputs that name none")
        inputs: List[PredictInput] = Field(min_length=1, max_length=settings.max_inputs)

    class PredictEnvelope(PredictRequest):  # checked first; then each input on its own, so all are named at once
        inputs: List[Any] = Field(min_length=1, max_length=settings.max_inputs)

    body_schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    predict_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/PredictRequest"}}}}}

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, dependencies=[Depends(authorize)],
              openapi_extra=predict_body, summary="Outputs of one or many inputs, any tasks mixed")
    async def predict(payload: Any = Body(None)):
        if not isinstance(payload, dict):
            raise APIError(422, INVALID_REQUEST, 'the body must be a JSON object {"task"?, "inputs": [...]}, got '
                                                 f"{_preview(payload)}")
        try:
            envelope = PredictEnvelope.model_validate(payload)
        except ValidationError as error:
            raise invalid_request(validation_problems(error.errors())) from None
        known = engine.tasks()
        bad, requests, positions = {}, [], []
        for index, entry in enumerate(envelope.inputs):
            request = read_input(entry, envelope.task, known)
            if isinstance(request, Request):
                requests.append(request)
                positions.append(index)
            else:
                bad[index] = request
        try:
            if bad:
                refused = engine.refusals(requests)
            else:
                results = await engine.predict_async(requests, timeout_s=settings.timeout_s, all_or_none=True)
                refused = [(i, r) for i, r in enumerate(results) if r.error is not None]
        except RequestsRefused as error:
            refused = error.failed
        except ServerOverloaded as error:
            raise queue_full(error) from None
        except TimeoutError:
            raise APIError(504, DEADLINE_EXCEEDED, f"no result within {settings.timeout_s} s (server busy)") from None
        bad.update((positions[i], (r.code, r.error)) for i, r in refused)
        if bad:
            failed = sorted(bad.items())
            index, (code, message) = failed[0]
            raise APIError(STATUS_OF_CODE.get(code, 500), code, f"inputs[{index}]: {message}",
                           details=[{"input": i, "code": c, "error": m} for i, (c, m) in failed])
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
        problems = validation_problems(error.errors())
        if any(p["type"] == "json_invalid" for p in problems):
            return error_response(400, "invalid_json", f"the body is not valid JSON: {problems[0]['message']}")
        return await api_error(request, invalid_request(problems))

    @app.exception_handler(Exception)
    async def internal(request, error: Exception):
        return error_response(500, "internal", f"internal error: {type(error).__name__}: {error}")

    default_openapi = app.openapi

    def openapi():  # the predict body is read as any JSON (to name every bad input), documented as PredictRequest
        if app.openapi_schema is None:
            schemas = default_openapi().setdefault("components", {}).setdefault("schemas", {})
            schemas.update(body_schema.get("$defs", {}), PredictRequest={k: v for k, v in body_schema.items()
                                                                         if k != "$defs"})
        return app.openapi_schema

    app.openapi = openapi
    paths = {route.path for route in app.routes}
    app.add_middleware(_Middleware, metrics=metrics, settings=settings, paths=paths)
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
