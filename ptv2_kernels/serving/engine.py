"""``PrefixServer``: one frozen, patched backbone serving a bank of prefix-tuned tasks in mixed-task batches.

- The bank is the patched model's ``PrefixEncoder`` with ``num_tasks = max_tasks`` slots; adding or
  removing a task writes one slot (no model reload). Each batch row carries its task's slot as
  ``task_ids``, read by the fused kernels' bank path: no per-task loop, no expanded prefix.
- Requests are tokenized, sorted by length and cut into batches under a token budget, then run packed
  (``cu_seqlens``, no padding tokens; BERT/RoBERTa) or padded (``packed=False``; always for DeBERTa).
- ``submit`` feeds a background batcher that groups concurrent requests (dynamic batching).
"""

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import patch_model
from .heads import Head
from .packed import PACKED_MODEL_TYPES, packed_forward


@dataclass(frozen=True)
class Request:
    """One input for task ``task``: ``text`` (with an optional ``text_pair``; needs a tokenizer) or
    ``input_ids`` (special tokens included, with optional ``token_type_ids``)."""

    task: str
    text: Optional[str] = None
    text_pair: Optional[str] = None
    input_ids: Optional[Sequence[int]] = None
    token_type_ids: Optional[Sequence[int]] = None


@dataclass
class Result:
    """The output of one request (``output``: see :class:`~ptv2_kernels.serving.heads.Head`), or ``error``."""

    task: str
    output: Optional[torch.Tensor] = None
    error: Optional[str] = None
    num_tokens: int = 0
    truncated: bool = False


@dataclass
class _Item:
    index: int
    request: Request
    ids: Optional[List[int]] = None
    types: Optional[List[int]] = None
    truncated: bool = False
    error: Optional[str] = None


class PrefixServer:
    """Serve many prefix-tuned tasks on one frozen BERT, RoBERTa, DeBERTa or DeBERTa-v2/v3 model.

    Args:
        model: an unpatched transformers model (``*ForSequenceClassification``, ``*ForTokenClassification``
            or a bare base model); it is patched in place with a bank of ``max_tasks`` (>= 2) slots.
        prefix_len: P of every task. ``layers``: prompt depth (None: all layers).
        tokenizer: a transformers tokenizer, needed for text requests.
        max_batch_tokens: token budget of one batch (packed: real tokens; padded: rows × longest row).
        max_batch_size: most requests per batch. ``max_wait_ms``: how long the batcher waits to fill a batch.
        packed: run sequences packed without padding (True) or padded (False). None (default): packed for
            BERT/RoBERTa, padded for DeBERTa, which has no packed path (``packed=True`` raises ValueError).
        backend: the ``prefix_attention`` backend.

    Over-long inputs: text is truncated to :attr:`max_length` tokens (``Result.truncated``); ``input_ids``
    longer than that are refused for that request. ``max_length`` is ``max_position_embeddings − P``
    (RoBERTa also ``− padding_idx − 1``); DeBERTa without absolute positions (``position_biased_input=False``,
    as in the released checkpoints) shifts nothing, so ``max_position_embeddings``.
    """

    def __init__(self, model: nn.Module, prefix_len: int, *, tokenizer=None, max_tasks: int = 16, layers=None,
                 max_batch_tokens: int = 8192, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 packed: Optional[bool] = None, backend: str = "auto"):
        if max_tasks < 2:
            raise ValueError(f"max_tasks must be >= 2 (the bank's slot count), got {max_tasks}")
        model_type = model.config.model_type
        if packed and model_type not in PACKED_MODEL_TYPES:
            raise ValueError(f"packed inference supports {PACKED_MODEL_TYPES} models; a {model_type!r} model is "
                             "served padded: pass packed=None (the default) or False")
        self.head = Head(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = patch_model(model, prefix_len, layers=layers, num_tasks=max_tasks, prefix_dropout=0.0,
                                   backend=backend)
        parameter = next(model.base_model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.encoder.to(self.dtype).requires_grad_(False)
        self.encoder.prefix.zero_()
        self.packed = model_type in PACKED_MODEL_TYPES if packed is None else packed
        embeddings = model.base_model.embeddings
        if embeddings.position_embeddings is None:  # DeBERTa with relative positions only
            self.max_length = model.config.max_position_embeddings
        else:
            first_position = embeddings.padding_idx + 1 if model_type == "roberta" else 0
            self.max_length = embeddings.position_embeddings.num_embeddings - first_position - prefix_len
        if tokenizer is not None and tokenizer.model_max_length:
            self.max_length = min(self.max_length, tokenizer.model_max_length)
        self.max_batch_tokens, self.max_batch_size, self.max_wait_ms = max_batch_tokens, max_batch_size, max_wait_ms
        self._slots: Dict[str, int] = {}
        self._heads: Dict[str, Optional[dict]] = {}
        self._lock = threading.RLock()
        self._queue: "queue.Queue" = queue.Queue()
        self._worker: Optional[threading.Thread] = None

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
        with self._lock:
            return list(self._slots)

    def add_task(self, name: str, prefix: torch.Tensor, head: Optional[Dict[str, torch.Tensor]] = None, *,
                 replace: bool = False) -> None:
        """Serve ``name`` with the compact ``prefix`` ``[L', 2, H, P, D]`` and optional head weights
        (state dict of ``self.head.module``: the model's ``classifier``; DeBERTa sequence classification:
        ``pooler.*`` and ``classifier.*``); see :meth:`add_tasks`."""
        self.add_tasks({name: (prefix, head)}, replace=replace)

    def add_tasks(self, tasks: Dict[str, tuple], *, replace: bool = False) -> None:
        """Serve every ``name: (prefix, head or None)`` of ``tasks`` at once: names, shapes, values, head
        weights and free slots are all checked before the bank is touched, so an error adds nothing."""
        checked = {}
        for name, (prefix, head) in tasks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"task name must be a non-empty string, got {name!r}")
            prefix = self._checked_prefix(prefix, name)
            if head is not None:
                self.head.check_state(head)
                head = {k: v.detach().to(self.device, self.dtype) for k, v in head.items()}
            checked[name] = prefix, head
        with self._lock:
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
            for name, (prefix, head) in checked.items():
                slot = self._slots.get(name, slots.get(name))
                self.encoder.prefix[slot].copy_(prefix)
                self._slots[name], self._heads[name] = slot, head

    def remove_task(self, name: str) -> None:
        """Stop serving ``name`` and free its slot; queued requests for it then fail as unknown."""
        with self._lock:
            if name not in self._slots:
                raise KeyError(f"unknown task {name!r}; served tasks: {list(self._slots)}")
            self.encoder.prefix[self._slots.pop(name)].zero_()
            del self._heads[name]

    def task_prefix(self, name: str) -> torch.Tensor:
        """A copy of task ``name``'s compact prefix ``[L', 2, H, P, D]``."""
        with self._lock:
            if name not in self._slots:
                raise KeyError(f"unknown task {name!r}; served tasks: {list(self._slots)}")
            return self.encoder.prefix[self._slots[name]].clone()

    def task_head(self, name: str) -> Optional[Dict[str, torch.Tensor]]:
        """Task ``name``'s own head weights, or None if it uses the model's head."""
        with self._lock:
            if name not in self._heads:
                raise KeyError(f"unknown task {name!r}; served tasks: {list(self._slots)}")
            return self._heads[name]

    def _checked_prefix(self, prefix, name: str) -> torch.Tensor:
        if not isinstance(prefix, torch.Tensor):
            raise TypeError(f"prefix of task {name!r} must be a tensor [L', 2, H, P, D], got {type(prefix).__name__}")
        expected = self.prefix_shape
        if tuple(prefix.shape) != expected:
            names = ("prefixed layers L'", "key/value", "heads H", "prefix_len P", "head_dim D")
            detail = [f"{n} {g} != {e}" for n, g, e in zip(names, prefix.shape, expected) if g != e]
            raise ValueError(f"prefix of task {name!r}: shape {tuple(prefix.shape)} does not fit the server's "
                             f"{expected} [L', 2, H, P, D]: {', '.join(detail) or 'wrong number of dimensions'}")
        if not torch.isfinite(prefix).all():
            raise ValueError(f"prefix of task {name!r} holds NaN or infinite values")
        return prefix.detach().to(self.device, self.dtype)

    # ---- requests ------------------------------------------------------------------------------------
    def predict(self, requests: Sequence[Request]) -> List[Result]:
        """Run ``requests`` (any tasks mixed) in length-sorted batches under the token budget; one
        :class:`Result` per request, in order. A bad request gets an error, the others are served."""
        items = self._tokenize(list(requests))
        results: List[Optional[Result]] = [None] * len(items)
        for item in items:
            if item.error is not None:
                results[item.index] = Result(item.request.task, error=item.error)
        for batch in self._plan([item for item in items if item.error is None]):
            for item, result in zip(batch, self._run_batch(batch)):
                results[item.index] = result
        return results

    def submit(self, request: Request) -> Future:
        """Queue ``request`` for the background batcher; the future resolves to its :class:`Result`."""
        future: Future = Future()
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_queue, name="ptv2-batcher", daemon=True)
                self._worker.start()
        self._queue.put((request, future))
        return future

    def close(self) -> None:
        """Stop the background batcher (after the requests already queued)."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._queue.put(None)
            worker.join()

    def _serve_queue(self) -> None:
        """Batcher loop: take the first waiting request, gather more until the token budget, the batch
        size or ``max_wait_ms`` is reached, then run them together."""
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            pending, deadline, stop = [entry], time.monotonic() + self.max_wait_ms / 1e3, False
            while len(pending) < self.max_batch_size and not stop:
                try:
                    entry = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if entry is None:
                    stop = True
                else:
                    pending.append(entry)
            try:
                results = self.predict([request for request, _ in pending])
            except Exception as error:  # noqa: BLE001  (delivered to every waiting caller)
                for _, future in pending:
                    future.set_exception(error)
            else:
                for (_, future), result in zip(pending, results):
                    future.set_result(result)
            if stop:
                return

    def _tokenize(self, requests: List[Request]) -> List[_Item]:
        """Token ids of every request (texts in one tokenizer call; those over ``max_length`` tokenized
        again with truncation); bad requests get an error."""
        items = [_Item(i, r) for i, r in enumerate(requests)]
        texts = []
        for item in items:
            request = item.request
            if not isinstance(request, Request):
                raise TypeError(f"predict/submit take Request objects, got {type(request).__name__}")
            if (request.text is None) == (request.input_ids is None):
                item.error = "give exactly one of text and input_ids"
            elif request.text is None:
                self._check_ids(item)
            elif self.tokenizer is None:
                item.error = "this server has no tokenizer; send input_ids"
            else:
                texts.append(item)
        long = self._encode(texts, truncation=False)
        long = [item for item in long if len(item.ids) > self.max_length]
        for item in self._encode(long, truncation=True):
            item.truncated = True
        return items

    def _encode(self, items: List[_Item], truncation: bool) -> List[_Item]:
        """Tokenize the texts of ``items`` into ``item.ids`` / ``item.types`` (one tokenizer call for the
        single texts, one for the pairs)."""
        singles = [i for i in items if i.request.text_pair is None]
        for group in (singles, [i for i in items if i.request.text_pair is not None]):
            if not group:
                continue
            pairs = None if group[0].request.text_pair is None else [i.request.text_pair for i in group]
            encoded = self.tokenizer([i.request.text for i in group], pairs, truncation=truncation,
                                     max_length=self.max_length if truncation else None)
            for n, item in enumerate(group):
                item.ids = encoded["input_ids"][n]
                item.types = encoded["token_type_ids"][n] if "token_type_ids" in encoded else None
        return items

    def _check_ids(self, item: _Item) -> None:
        request, vocab, types = item.request, self.model.config.vocab_size, self.model.config.type_vocab_size
        ids = list(request.input_ids)
        if not ids:
            item.error = "input_ids is empty"
        elif len(ids) > self.max_length:
            item.error = (f"input has {len(ids)} tokens, at most {self.max_length} fit (server.max_length, from "
                          "max_position_embeddings and prefix_len); send text to truncate, or shorten it")
        elif not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            item.error = f"input_ids must be integers in [0, {vocab})"
        elif request.token_type_ids is not None and len(request.token_type_ids) != len(ids):
            item.error = "token_type_ids must have one entry per input id"
        elif types and request.token_type_ids is not None and not all(isinstance(t, int) and 0 <= t < types
                                                                      for t in request.token_type_ids):
            item.error = f"token_type_ids must be integers in [0, {types}) (type_vocab_size)"
        else:
            item.ids = ids
            item.types = None if request.token_type_ids is None else list(request.token_type_ids)

    def _plan(self, items: List[_Item]) -> List[List[_Item]]:
        """Length bucketing: sort by length, cut greedily under the token budget and the batch size."""
        batches, current = [], []
        for item in sorted(items, key=lambda i: len(i.ids)):
            candidate = current + [item]
            cost = sum(len(i.ids) for i in candidate) if self.packed else len(candidate) * len(item.ids)
            if current and (cost > self.max_batch_tokens or len(candidate) > self.max_batch_size):
                batches.append(current)
                candidate = [item]
            current = candidate
        return batches + ([current] if current else [])

    @torch.inference_mode()
    def _run_batch(self, batch: List[_Item]) -> List[Result]:
        """One mixed-task forward of ``batch``; unknown tasks are answered with an error, the rest run."""
        with self._lock:
            known = [item for item in batch if item.request.task in self._slots]
            results = {id(item): Result(item.request.task, error=f"unknown task {item.request.task!r}; served "
                                        f"tasks: {list(self._slots)}")
                       for item in batch if item.request.task not in self._slots}
            if known:
                task_ids = torch.tensor([self._slots[i.request.task] for i in known], device=self.device)
                heads = [self._heads[i.request.task] for i in known]
                tokens, cu_seqlens = self._forward(known, task_ids)
                for item, output in zip(known, self.head(tokens, cu_seqlens, heads)):
                    results[id(item)] = Result(item.request.task, output=output.float().cpu(),
                                               num_tokens=len(item.ids), truncated=item.truncated)
        return [results[id(item)] for item in batch]

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
            return packed_forward(self.model, ids, cu_seqlens, task_ids, packed_types), cu_seqlens
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
        states = self.model.base_model(**inputs, task_ids=task_ids).last_hidden_state
        return states[mask.to(self.device)], cu_seqlens
