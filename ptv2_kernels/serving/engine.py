"""``PrefixServer``: one frozen, patched backbone serving a bank of prefix-tuned tasks in mixed-task batches.

- The bank is the patched model's ``PrefixEncoder`` with ``num_tasks = max_tasks`` slots; adding or
  removing a task writes one slot (no model reload). Each batch row carries its task's slot as
  ``task_ids``, read by the fused kernels' bank path: no per-task loop, no expanded prefix.
- Requests are checked twice before they can join a batch: when they are made (:class:`Request`: types and
  shape) and when they reach the server (task known, tokenized, ids inside the vocabulary, length). A bad
  request gets an error :class:`Result` of its own; a batch whose forward raises is retried row by row, so
  only the failing request gets the error. One bad request never fails another.
- Batches: length-sorted, cut under a token budget, run packed (``cu_seqlens``, no padding tokens; every
  family) or padded (``packed=False``).
- ``submit`` / ``predict_async`` feed the background batcher, the one thread that runs the model (under
  ``torch.inference_mode``): a bounded queue (``max_queue`` requests; beyond it :class:`ServerOverloaded`),
  per-request deadlines, dynamic batching for up to ``max_wait_ms``. A request whose future is cancelled (its
  caller stopped waiting: an HTTP client that disconnected, a cancelled or timed-out ``predict_async``) leaves
  the queue at once, so no batch waits for it or computes it. ``close`` drains the queue.
"""

import asyncio
import functools
import itertools
import logging
import math
import numbers
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..patching import patch_model
from .heads import Head
from .packed import packed_forward

log = logging.getLogger(__name__)

# Result.code: why a request got no output
UNKNOWN_TASK = "unknown_task"
INVALID_INPUT = "invalid_input"
INFERENCE_FAILED = "inference_failed"
DEADLINE_EXCEEDED = "deadline_exceeded"


def unknown_task_message(task: str, known) -> str:
    """The error of a request for a task the server does not serve."""
    return f"unknown task {task!r}; served tasks: {list(known)}"


def _type_name(value) -> str:
    return type(value).__name__


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_type_name(value)} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_nonnegative(name: str, value, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0{' or None' if allow_none else ''}, got "
                        f"{_type_name(value)} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _check_name(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty string, got {_type_name(value)} {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty string, got ''")
    return value


def _token_list(name: str, value) -> Optional[Tuple[int, ...]]:
    """``value`` (a list/tuple/range of ints or a 1-D integer tensor) as a tuple of ints; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints, got a {value.dtype} tensor of "
                            f"shape {tuple(value.shape)}")
        return tuple(value.tolist())
    if not isinstance(value, (list, tuple, range)):
        raise TypeError(f"{name} must be a list of ints, got {_type_name(value)}")
    bad = [t for t in value if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if bad:
        raise TypeError(f"{name} must hold ints only, got {_type_name(bad[0])} {bad[0]!r}")
    return tuple(int(t) for t in value)


@dataclass(frozen=True)
class Request:
    """One input for task ``task``: ``text`` (with an optional ``text_pair``; needs a tokenizer) or
    ``input_ids`` (special tokens included, with optional ``token_type_ids``: lists of ints or 1-D integer
    tensors, stored as tuples). Checked when it is made: TypeError/ValueError naming the field."""

    task: str
    text: Optional[str] = None
    text_pair: Optional[str] = None
    input_ids: Optional[Sequence[int]] = None
    token_type_ids: Optional[Sequence[int]] = None

    def __post_init__(self):
        _check_name("Request.task", self.task)
        for name in ("text", "text_pair"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"Request.{name} must be a string or None, got {_type_name(value)} {value!r}")
        for name in ("input_ids", "token_type_ids"):
            object.__setattr__(self, name, _token_list(f"Request.{name}", getattr(self, name)))
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("a Request needs exactly one of text and input_ids, got "
                             f"{'both' if self.text is not None else 'neither'}")
        if self.text_pair is not None and self.text is None:
            raise ValueError("Request.text_pair needs Request.text (input_ids carry pairs with token_type_ids)")
        if self.token_type_ids is not None:
            if self.input_ids is None:
                raise ValueError("Request.token_type_ids needs Request.input_ids")
            if len(self.token_type_ids) != len(self.input_ids):
                raise ValueError(f"Request.token_type_ids must have one entry per input id ({len(self.input_ids)}), "
                                 f"got {len(self.token_type_ids)}")


@dataclass
class Result:
    """The output of one request (``output``: see :class:`~ptv2_kernels.serving.heads.Head`), or ``error`` with
    its ``code`` (``unknown_task``, ``invalid_input``, ``inference_failed``, ``deadline_exceeded``)."""

    task: str
    output: Optional[torch.Tensor] = None
    error: Optional[str] = None
    num_tokens: int = 0
    truncated: bool = False
    code: Optional[str] = None


@dataclass(frozen=True)
class BatchStats:
    """What one batch ran: ``rows`` requests, ``tokens`` (real tokens), each row's task, wall ``seconds``."""

    rows: int
    tokens: int
    tasks: Tuple[str, ...]
    seconds: float


class RequestsRefused(ValueError):
    """``predict_async(..., all_or_none=True)`` refused some requests before queueing any: ``failed`` holds
    ``(index, error Result)`` of every refused request, in order."""

    def __init__(self, failed: List[Tuple[int, Result]]):
        super().__init__(f"{len(failed)} request(s) refused, first requests[{failed[0][0]}]: {failed[0][1].error}")
        self.failed = failed


class ServerOverloaded(RuntimeError):
    """The batcher's queue is full (``max_queue`` requests waiting): retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    index: int
    request: Request
    ids: Optional[List[int]] = None
    types: Optional[List[int]] = None
    truncated: bool = False
    result: Optional[Result] = None
    future: Optional[Future] = None
    deadline: Optional[float] = None
    enqueued: float = 0.0

    def fail(self, code: str, message: str) -> None:
        self.result = Result(self.request.task, error=message, code=code)


class PrefixServer:
    """Serve many prefix-tuned tasks on one frozen BERT, RoBERTa, DeBERTa or DeBERTa-v2/v3 model.

    Args:
        model: an unpatched transformers model (``*ForSequenceClassification``, ``*ForTokenClassification``
            or a bare base model); it is patched in place with a bank of ``max_tasks`` (>= 2) slots.
        prefix_len: P of every task. ``layers``: prompt depth (None: all layers).
        tokenizer: a transformers tokenizer, needed for text requests.
        max_batch_tokens: token budget of one batch (packed: real tokens; padded: rows × longest row).
        max_batch_size: most requests per batch. ``max_wait_ms``: how long the batcher waits to fill a batch.
        max_queue: most requests waiting for the batcher; ``submit``/``predict_async`` beyond it raise
            :class:`ServerOverloaded`.
        packed: run sequences packed without padding (True, the default for every family) or padded (False).
        backend: the ``prefix_attention`` backend.
        torch_compile: run the backbone through ``torch.compile`` (inductor, dynamic shapes: batches of any size
            and length reuse one compilation; the first batch pays the compile). Same outputs as eager to
            float rounding.

    Over-long inputs: text is truncated to :attr:`max_length` tokens (``Result.truncated``); ``input_ids``
    longer than that are refused for that request. ``max_length`` is ``max_position_embeddings − P``
    (RoBERTa also ``− padding_idx − 1``); DeBERTa without absolute positions (``position_biased_input=False``,
    as in the released checkpoints) shifts nothing, so ``max_position_embeddings``.
    """

    def __init__(self, model: nn.Module, prefix_len: int, *, tokenizer=None, max_tasks: int = 16, layers=None,
                 max_batch_tokens: int = 8192, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, packed: Optional[bool] = None, backend: str = "auto",
                 torch_compile: bool = False):
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model (an nn.Module with a config), got {_type_name(model)}")
        prefix_len = _check_int("prefix_len", prefix_len, 1)
        max_tasks = _check_int("max_tasks (the bank's slot count)", max_tasks, 2)
        self.max_batch_tokens = _check_int("max_batch_tokens", max_batch_tokens, 1)
        self.max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        self.max_wait_ms = _check_nonnegative("max_wait_ms", max_wait_ms, allow_none=False)
        if packed is not None and not isinstance(packed, bool):
            raise TypeError(f"packed must be True, False or None, got {_type_name(packed)} {packed!r}")
        if not isinstance(torch_compile, bool):
            raise TypeError(f"torch_compile must be a bool, got {_type_name(torch_compile)} {torch_compile!r}")
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer (callable) or None, got "
                            f"{_type_name(tokenizer)}")
        self.head = Head(model)  # TypeError for an unsupported model, before anything is patched
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = patch_model(model, prefix_len, layers=layers, num_tasks=max_tasks, prefix_dropout=0.0,
                                   backend=backend)
        parameter = next(model.base_model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.encoder.to(self.dtype).requires_grad_(False)
        self.encoder.prefix.zero_()
        self.packed = self.head.family.serves_packed if packed is None else packed
        self._packed_forward, self._base_forward = packed_forward, model.base_model
        if torch_compile:
            self._packed_forward = torch.compile(packed_forward, dynamic=True)
            self._base_forward = torch.compile(model.base_model, dynamic=True)
        self.max_length = self.head.family.max_length(model.base_model, prefix_len)
        if tokenizer is not None and tokenizer.model_max_length:
            self.max_length = min(self.max_length, tokenizer.model_max_length)
        self._slots: Dict[str, int] = {}
        self._heads: Dict[str, Optional[dict]] = {}
        # the model and the bank tensor: held while a batch runs or the bank is written; the name -> slot/head
        # tables: held briefly (so request preparation on an event loop never waits for a forward); order: model, tasks
        self._model_lock = threading.RLock()
        self._tasks_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not be called from two threads at once
        self._cond = threading.Condition()  # the batcher's queue, in arrival order; guards _cancelled too
        self._pending: "OrderedDict[int, _Item]" = OrderedDict()  # id(item) -> item
        self._cancelled = 0
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        self._seconds_per_row = 0.0  # moving average, for ServerOverloaded.retry_after_s
        self._observers: List[Callable[[BatchStats], None]] = []

    # ---- the task bank -------------------------------------------------------------------------------
    @property
    def prefix_config(self):
        """The bank's :class:`~ptv2_kernels.PrefixConfig` (``num_tasks`` = slots)."""
        return self.encoder.config

    @property
    def prefix_shape(self) -> tuple:
        """Shape of one task's compact prefix: ``[L', 2, H, P, D]``."""
        return tuple(self.prefix_config.shape[1:])

    def tasks(self) -> List[str]:
        """Names of the served tasks, in the order they were added."""
        with self._tasks_lock:
            return list(self._slots)

    def add_task(self, name: str, prefix: torch.Tensor, head: Optional[Dict[str, torch.Tensor]] = None, *,
                 replace: bool = False) -> None:
        """Serve ``name`` with the compact ``prefix`` ``[L', 2, H, P, D]`` and optional head weights
        (state dict of ``self.head.module``: the model's ``classifier``; DeBERTa sequence classification:
        ``pooler.*`` and ``classifier.*``); see :meth:`add_tasks`."""
        _check_name("name", name)
        self.add_tasks({name: (prefix, head)}, replace=replace)

    def add_tasks(self, tasks: Dict[str, tuple], *, replace: bool = False) -> None:
        """Serve every ``name: (prefix, head or None)`` of ``tasks`` at once: names, shapes, values, head
        weights and free slots are all checked before the bank is touched, so an error adds nothing."""
        if not isinstance(tasks, dict):
            raise TypeError(f"tasks must be a dict {{name: (prefix, head or None)}}, got {_type_name(tasks)}")
        if not isinstance(replace, bool):
            raise TypeError(f"replace must be a bool, got {_type_name(replace)} {replace!r}")
        checked = {}
        for name, value in tasks.items():
            _check_name("task name", name)
            if not isinstance(value, tuple) or len(value) != 2:
                raise TypeError(f"tasks[{name!r}] must be a (prefix, head or None) pair, got {_type_name(value)}")
            checked[name] = self.check_task(name, *value)
        with self._model_lock, self._tasks_lock:
            clashes = sorted(set(checked) & set(self._slots))
            if clashes and not replace:
                raise ValueError(f"tasks {clashes} already exist; pass replace=True or remove_task them first")
            free = sorted(set(range(self.prefix_config.num_tasks)) - set(self._slots.values()))
            new = [name for name in checked if name not in self._slots]
            if len(new) > len(free):
                raise RuntimeError(f"the task bank is full: {len(new)} new tasks, {len(free)} free slots "
                                   f"(max_tasks={self.prefix_config.num_tasks}); remove tasks first or build the "
                                   "server with a larger max_tasks")
            slots = dict(zip(new, free))
            for name, (prefix, head) in checked.items():  # nothing below can fail
                slot = self._slots.get(name, slots.get(name))
                self.encoder.prefix[slot].copy_(prefix)
                self._slots[name], self._heads[name] = slot, head

    def check_task(self, name: str, prefix, head=None) -> tuple:
        """``(prefix, head)`` of task ``name`` as the bank stores them (device and dtype of the model), after
        checking them against the server: TypeError/ValueError naming what does not fit. Adds nothing."""
        if not isinstance(prefix, torch.Tensor):
            raise TypeError(f"prefix of task {name!r} must be a tensor [L', 2, H, P, D], got {_type_name(prefix)}")
        if not prefix.dtype.is_floating_point:
            raise TypeError(f"prefix of task {name!r} must be a floating-point tensor, got dtype {prefix.dtype}")
        expected = self.prefix_shape
        if tuple(prefix.shape) != expected:
            names = ("prefixed layers L'", "key/value", "heads H", "prefix_len P", "head_dim D")
            detail = ", ".join(f"{n} {g} != {e}" for n, g, e in zip(names, prefix.shape, expected) if g != e)
            if prefix.dim() != len(expected):
                detail = f"wrong number of dimensions ({prefix.dim()} != {len(expected)})"
            raise ValueError(f"prefix of task {name!r}: shape {tuple(prefix.shape)} does not fit the server's "
                             f"{expected} [L', 2, H, P, D]: {detail}")
        if not torch.isfinite(prefix).all():
            raise ValueError(f"prefix of task {name!r} holds NaN or infinite values")
        if head is not None:
            if not isinstance(head, dict):
                raise TypeError(f"head of task {name!r} must be a state dict {{name: tensor}} or None, got "
                                f"{_type_name(head)}")
            for key, value in head.items():
                if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
                    raise TypeError(f"head of task {name!r}: {key!r} must be a floating-point tensor, got "
                                    f"{getattr(value, 'dtype', _type_name(value))}")
                if not torch.isfinite(value).all():
                    raise ValueError(f"head of task {name!r}: {key!r} holds NaN or infinite values")
            self.head.check_state(head)
            head = {k: v.detach().to(self.device, self.dtype) for k, v in head.items()}
        return prefix.detach().to(self.device, self.dtype), head

    def _slot(self, name) -> int:
        _check_name("name", name)
        if name not in self._slots:
            raise KeyError(unknown_task_message(name, self._slots))
        return self._slots[name]

    def remove_task(self, name: str) -> None:
        """Stop serving ``name`` and free its slot; queued requests for it then fail as unknown."""
        with self._model_lock, self._tasks_lock:
            self.encoder.prefix[self._slot(name)].zero_()
            del self._slots[name], self._heads[name]

    def task_prefix(self, name: str) -> torch.Tensor:
        """A copy of task ``name``'s compact prefix ``[L', 2, H, P, D]``."""
        with self._tasks_lock:  # the bank is written with both locks held
            return self.encoder.prefix[self._slot(name)].clone()

    def task_head(self, name: str) -> Optional[Dict[str, torch.Tensor]]:
        """Task ``name``'s own head weights, or None if it uses the model's head."""
        with self._tasks_lock:
            self._slot(name)
            return self._heads[name]

    # ---- requests ------------------------------------------------------------------------------------
    def predict(self, requests: Sequence[Request]) -> List[Result]:
        """Run ``requests`` (any tasks mixed) in length-sorted batches under the token budget, in the calling
        thread; one :class:`Result` per request, in order. A bad request gets an error, the others are served."""
        items = self._prepare(_check_requests(requests))
        self._run_items([item for item in items if item.result is None])
        return [item.result for item in items]

    def submit(self, request: Request, *, timeout_s: Optional[float] = None) -> Future:
        """Queue ``request`` for the background batcher; the future resolves to its :class:`Result` (an error
        result at once for a bad request; ``deadline_exceeded`` if ``timeout_s`` passes before it runs).
        Raises :class:`ServerOverloaded` when ``max_queue`` requests are waiting."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a Request, got {_type_name(request)}")
        return self._enqueue(self._prepare([request]), timeout_s)[0]

    def refusals(self, requests: Sequence[Request]) -> List[Tuple[int, Result]]:
        """``(index, error Result)`` of every request of ``requests`` the server would refuse before batching
        (unknown task, ids outside the vocabulary, too long, a text the tokenizer refuses); nothing is queued."""
        return _refused(self._prepare(_check_requests(requests)))

    async def predict_async(self, requests: Sequence[Request], *, timeout_s: Optional[float] = None,
                            all_or_none: bool = False) -> List[Result]:
        """:meth:`predict` through the background batcher, awaited: all of ``requests`` are queued at once (or
        none: :class:`ServerOverloaded`), batched with other callers' requests, and awaited together; after
        ``timeout_s`` the ones not yet run are withdrawn and TimeoutError is raised, and if the awaiting task is
        cancelled they leave the queue too. ``all_or_none``: if any request is refused before batching (see
        :meth:`refusals`), none is queued and :class:`RequestsRefused` names every refused one."""
        if not isinstance(all_or_none, bool):
            raise TypeError(f"all_or_none must be a bool, got {_type_name(all_or_none)} {all_or_none!r}")
        items = self._prepare(_check_requests(requests))
        if all_or_none and _refused(items):
            raise RequestsRefused(_refused(items))
        futures = self._enqueue(items, timeout_s)
        waiting = [asyncio.wrap_future(future) for future in futures]
        try:
            _, late = await asyncio.wait(waiting, timeout=timeout_s) if waiting else ((), ())
        finally:  # timed out or cancelled: what has not run leaves the queue (a no-op on finished futures)
            for future in futures:
                future.cancel()
        if late:
            raise TimeoutError(f"{len(late)} of {len(futures)} request(s) got no result within timeout_s={timeout_s}")
        return [result.result() for result in waiting]

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the batcher."""
        return len(self._pending)

    @property
    def cancelled_requests(self) -> int:
        """Requests dropped from the queue unrun because their future was cancelled (the caller stopped waiting)."""
        return self._cancelled

    def on_batch(self, callback: Callable[[BatchStats], None]) -> None:
        """Call ``callback(BatchStats)`` after every batch (metrics); its exceptions are logged, not raised."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {_type_name(callback)}")
        self._observers.append(callback)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward of a short dummy row through the model (bank slot 0), so the first request does not pay
        for lazy initialisation (kernel compilation, allocator growth)."""
        length = min(8, self.max_length)
        item = _Item(0, Request("warm-up", input_ids=[0] * length), ids=[0] * length)
        with self._model_lock:
            self._forward([item], torch.zeros(1, dtype=torch.long, device=self.device))

    def close(self) -> None:
        """Stop the background batcher after it has run every queued request; later ``submit`` calls raise."""
        with self._cond:
            self._closed = True
            worker, self._worker = self._worker, None
            self._cond.notify_all()
        if worker is not None:
            worker.join()

    def _enqueue(self, items: List[_Item], timeout_s) -> List[Future]:
        """Futures of ``items``: resolved now for items that already have a (error) result, the others queued
        all together (ServerOverloaded if they do not fit)."""
        timeout_s = _check_nonnegative("timeout_s", timeout_s)
        queued = [item for item in items if item.result is None]
        if len(queued) > self.max_queue:
            raise ValueError(f"{len(queued)} requests at once cannot fit a queue of max_queue={self.max_queue}")
        futures = []
        for item in items:
            item.future = Future()
            if item.result is not None:
                item.future.set_result(item.result)
            else:
                item.future.add_done_callback(functools.partial(self._leave_queue, item))
            futures.append(item.future)
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is closed: no more requests are accepted")
            waiting = len(self._pending)
            if waiting + len(queued) > self.max_queue:
                retry = max(1.0, math.ceil(waiting * self._seconds_per_row))
                raise ServerOverloaded(f"the server is overloaded: {waiting} requests are waiting (max_queue="
                                       f"{self.max_queue}); retry after {retry:.0f} s", retry)
            now = time.monotonic()
            for item in queued:
                item.enqueued, item.deadline = now, None if timeout_s is None else now + timeout_s
                self._pending[id(item)] = item
            if queued and self._worker is None:
                self._worker = threading.Thread(target=self._serve_queue, name="ptv2-batcher", daemon=True)
                self._worker.start()
            self._cond.notify()
        return futures

    def _leave_queue(self, item: _Item, future: Future) -> None:
        """Done-callback of a queued item's future: a cancelled one leaves the queue (and is counted)."""
        if future.cancelled():
            with self._cond:
                self._pending.pop(id(item), None)
                self._cancelled += 1

    def _cost(self, items) -> int:
        """Token cost of running ``items`` as one batch (packed: real tokens; padded: rows × longest row)."""
        lengths = [len(i.ids) for i in items]
        return sum(lengths) if self.packed else len(lengths) * max(lengths, default=0)

    def _serve_queue(self) -> None:
        """Batcher loop: run the next batch until the server is closed and the queue empty."""
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            self._run_queued(batch)

    def _next_batch(self) -> Optional[List[_Item]]:
        """(Under ``_cond``.) Wait for the first request, gather more for up to ``max_wait_ms`` after its arrival
        (or until the batch size or token budget is reached), then take a batch in arrival order; None once
        closed and empty. Requests cancelled meanwhile have left the queue: they neither fill nor join it."""
        while True:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = next(iter(self._pending.values())).enqueued + self.max_wait_ms / 1e3
            while (self._pending and not self._closed and len(self._pending) < self.max_batch_size
                   and self._cost(self._pending.values()) < self.max_batch_tokens):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = []
            for item in itertools.islice(self._pending.values(), self.max_batch_size):
                if batch and self._cost(batch + [item]) > self.max_batch_tokens:
                    break
                batch.append(item)
            for item in batch:
                del self._pending[id(item)]
            if batch:
                return batch

    def _run_queued(self, batch: List[_Item]) -> None:
        now, live = time.monotonic(), []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled after it left the queue for this batch (counted by _leave_queue)
            if item.deadline is not None and now > item.deadline:
                item.fail(DEADLINE_EXCEEDED, "the request's deadline passed before it could run (server busy)")
                item.future.set_result(item.result)
                continue
            live.append(item)
        try:
            self._run_items(live)
        except BaseException as error:  # a bug: every waiting caller must still hear back
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error)
            raise
        for item in live:
            item.future.set_result(item.result)

    def _prepare(self, requests: List[Request]) -> List[_Item]:
        """One item per request with its token ids, or with an error result (unknown task, no tokenizer,
        ids outside the vocabulary, too long, the tokenizer failed on it)."""
        items = [_Item(i, r) for i, r in enumerate(requests)]
        with self._tasks_lock:
            known = list(self._slots)
        texts = []
        for item in items:
            if item.request.task not in known:
                item.fail(UNKNOWN_TASK, unknown_task_message(item.request.task, known))
            elif item.request.input_ids is not None:
                self._check_ids(item)
            elif self.tokenizer is None:
                item.fail(INVALID_INPUT, "this server has no tokenizer; send input_ids")
            else:
                texts.append(item)
        with self._tokenizer_lock:
            self._encode(texts, truncation=False)
            long = [item for item in texts if item.result is None and len(item.ids) > self.max_length]
            self._encode(long, truncation=True)
        for item in long:
            item.truncated = item.result is None
        return items

    def _encode(self, items: List[_Item], truncation: bool) -> None:
        """Tokenize the texts of ``items`` into ``item.ids`` / ``item.types``: one tokenizer call for the single
        texts, one for the pairs; if a call raises, each of its texts alone, so only a bad one gets the error."""
        singles = [i for i in items if i.request.text_pair is None]
        for group in (singles, [i for i in items if i.request.text_pair is not None]):
            try:
                self._encode_group(group, truncation)
            except Exception:  # noqa: BLE001  (isolate the text that breaks the tokenizer)
                for item in group:
                    try:
                        self._encode_group([item], truncation)
                    except Exception as error:  # noqa: BLE001
                        item.fail(INVALID_INPUT, f"the tokenizer cannot encode this text: {type(error).__name__}: "
                                                 f"{error}")

    def _encode_group(self, group: List[_Item], truncation: bool) -> None:
        if not group:
            return
        pairs = None if group[0].request.text_pair is None else [i.request.text_pair for i in group]
        encoded = self.tokenizer([i.request.text for i in group], pairs, truncation=truncation,
                                 max_length=self.max_length if truncation else None)
        for n, item in enumerate(group):
            item.ids = list(encoded["input_ids"][n])
            item.types = list(encoded["token_type_ids"][n]) if "token_type_ids" in encoded else None
            if not item.ids:
                item.fail(INVALID_INPUT, "the text has no tokens")

    def _check_ids(self, item: _Item) -> None:
        request, vocab, types = item.request, self.model.config.vocab_size, self.model.config.type_vocab_size
        ids = request.input_ids
        if not ids:
            item.fail(INVALID_INPUT, "input_ids is empty")
        elif len(ids) > self.max_length:
            item.fail(INVALID_INPUT, f"input has {len(ids)} tokens, at most {self.max_length} fit (server.max_length, "
                                     "from max_position_embeddings and prefix_len); send text to truncate, or "
                                     "shorten it")
        elif not all(0 <= t < vocab for t in ids):
            item.fail(INVALID_INPUT, f"input_ids must be integers in [0, {vocab}) (vocab_size)")
        elif types and request.token_type_ids is not None and not all(0 <= t < types for t in request.token_type_ids):
            item.fail(INVALID_INPUT, f"token_type_ids must be integers in [0, {types}) (type_vocab_size)")
        else:
            item.ids = list(ids)
            item.types = None if request.token_type_ids is None else list(request.token_type_ids)

    def _plan(self, items: List[_Item]) -> List[List[_Item]]:
        """Length bucketing: sort by length, cut greedily under the token budget and the batch size."""
        batches, current = [], []
        for item in sorted(items, key=lambda i: len(i.ids)):
            candidate = current + [item]
            if current and (self._cost(candidate) > self.max_batch_tokens or len(candidate) > self.max_batch_size):
                batches.append(current)
                candidate = [item]
            current = candidate
        return batches + ([current] if current else [])

    def _run_items(self, items: List[_Item]) -> None:
        """Set the result of every item: planned batches, each retried row by row if its forward raises."""
        for batch in self._plan(items):
            self._run_isolated(batch)

    def _run_isolated(self, batch: List[_Item]) -> None:
        try:
            self._run_batch(batch)
        except Exception as error:  # noqa: BLE001  (find the row that fails; the others are served)
            if len(batch) == 1:
                batch[0].fail(INFERENCE_FAILED, f"inference failed: {type(error).__name__}: {error}")
                return
            for item in batch:
                self._run_isolated([item])

    @torch.inference_mode()
    def _run_batch(self, batch: List[_Item]) -> None:
        """One mixed-task forward of ``batch``; tasks removed since the request was queued get an error."""
        start = time.perf_counter()
        with self._model_lock:
            with self._tasks_lock:
                known = [item for item in batch if item.request.task in self._slots]
                for item in batch:
                    if item.request.task not in self._slots:
                        item.fail(UNKNOWN_TASK, unknown_task_message(item.request.task, self._slots))
                slots = [self._slots[i.request.task] for i in known]
                heads = [self._heads[i.request.task] for i in known]
            if not known:
                return
            task_ids = torch.tensor(slots, device=self.device)
            tokens, cu_seqlens = self._forward(known, task_ids)
            outputs = [output.float().cpu() for output in self.head(tokens, cu_seqlens, heads)]
        for item, output in zip(known, outputs):
            item.result = Result(item.request.task, output=output, num_tokens=len(item.ids), truncated=item.truncated)
        seconds = time.perf_counter() - start
        self._seconds_per_row = 0.9 * self._seconds_per_row + 0.1 * seconds / len(known)
        stats = BatchStats(len(known), sum(len(i.ids) for i in known), tuple(i.request.task for i in known), seconds)
        for observer in self._observers:
            try:
                observer(stats)
            except Exception:  # noqa: BLE001  (metrics must not fail requests)
                log.exception("a batch observer of PrefixServer raised")

    def _forward(self, items: List[_Item], task_ids: torch.Tensor):
        """Final token states packed ``[total, hidden]`` and ``cu_seqlens`` ``[B + 1]``."""
        lengths = torch.tensor([len(i.ids) for i in items])
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(self.device)
        types = None
        if any(i.types is not None for i in items):
            types = [i.types if i.types is not None else [0] * len(i.ids) for i in items]
        if self.packed:
            ids = torch.tensor([t for i in items for t in i.ids], device=self.device)
            packed_types = None if types is None else torch.tensor([t for r in types for t in r], device=self.device)
            return self._packed_forward(self.model, ids, cu_seqlens, task_ids, packed_types), cu_seqlens
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        pad_id = self.model.config.pad_token_id or 0
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        ids[mask] = torch.tensor([t for i in items for t in i.ids])
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        if types is not None:
            inputs["token_type_ids"] = torch.zeros_like(ids)
            inputs["token_type_ids"][mask] = torch.tensor([t for row in types for t in row])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        states = self._base_forward(**inputs, task_ids=task_ids).last_hidden_state
        return states[mask.to(self.device)], cu_seqlens


def _refused(items: List[_Item]) -> List[Tuple[int, Result]]:
    return [(item.index, item.result) for item in items if item.result is not None]


def _check_requests(requests) -> List[Request]:
    if isinstance(requests, Request):
        raise TypeError("requests must be a list of Request objects, got a single Request (wrap it in a list)")
    if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Sequence):
        raise TypeError(f"requests must be a list of Request objects, got {_type_name(requests)}")
    bad = [r for r in requests if not isinstance(r, Request)]
    if bad:
        raise TypeError(f"requests must hold Request objects only, got {_type_name(bad[0])}")
    return list(requests)
