"""What ``ptv2-serve`` (:mod:`~ptv2_kernels.serving.cli`) and every Ray Serve replica (:mod:`~ptv2_kernels.serving.ray`)
share: the argument parser, the engine built from parsed arguments (model, banks, tasks, limits) and the HTTP
settings."""

import argparse
import os
import sys

import torch

from .checkpoints import load_bank, load_task
from .engine import PrefixServer
from .heads import EMBEDDING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

AUTO_CLASSES = {SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
                TOKEN_CLASSIFICATION: "AutoModelForTokenClassification", EMBEDDING: "AutoModel"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
API_KEYS_ENV = "PTV2_API_KEYS"


def _task(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptv2-serve", description="Serve prefix-tuned (P-Tuning v2) tasks on one frozen "
                                "encoder (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DeBERTa) over HTTP: POST "
                                "/v1/predict, GET /v1/tasks, /health, /ready, /metrics, /docs.")
    p.add_argument("--model", required=True, help="transformers model directory or hub name (the frozen backbone)")
    p.add_argument("--output", choices=tuple(AUTO_CLASSES), default=SEQUENCE_CLASSIFICATION,
                   help="model head (default: sequence-classification)")
    p.add_argument("--num-labels", type=_positive(int), help="labels of the classification head (default: the model's)")
    p.add_argument("--prefix-len", type=_positive(int), required=True, help="P of every task")
    p.add_argument("--layers", type=int, nargs="+", help="prompt depth: prefixed layer indices (default: all)")
    p.add_argument("--task", type=_task, action="append", default=[], metavar="NAME=PATH",
                   help="a task checkpoint: save_prefix file, PEFT adapter directory or P-Tuning v2 reference "
                        "checkpoint, imported with its head (repeatable)")
    p.add_argument("--bank", action="append", default=[], metavar="DIR", help="a bank directory (save_bank)")
    p.add_argument("--max-tasks", type=_positive(int), default=16, help="task slots in the bank (default: 16)")
    p.add_argument("--max-batch-tokens", type=_positive(int), default=8192, help="token budget per batch (8192)")
    p.add_argument("--max-batch-size", type=_positive(int), default=64, help="requests per batch (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batcher wait to fill a batch (default: 5)")
    p.add_argument("--max-queue", type=_positive(int), default=1024,
                   help="requests waiting for the batcher before 429 (default: 1024)")
    p.add_argument("--padded", action="store_true", help="pad batches instead of packing the sequences")
    p.add_argument("--compile", action="store_true",
                   help="run the backbone under torch.compile (dynamic shapes; the first batches pay the compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (local only)")
    http.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free port")
    http.add_argument("--api-key", action="append", default=[], metavar="KEY",
                      help=f"accept 'Authorization: Bearer KEY' (repeatable; also {API_KEYS_ENV}, comma-separated). "
                           "With keys every /v1 endpoint needs one; without, /v1/predict and GET /v1/tasks are "
                           "open and the admin endpoints are refused")
    http.add_argument("--max-body-bytes", type=_positive(int), default=1 << 20, help="request body limit (1 MiB)")
    http.add_argument("--max-inputs", type=_positive(int), default=64, help="inputs per request (default: 64)")
    http.add_argument("--request-timeout-s", type=_positive(float), default=30.0,
                      help="per-request deadline, then 504 (default: 30)")
    http.add_argument("--task-root", help="admin POST /v1/tasks may only load paths inside this directory")
    http.add_argument("--verbose", action="store_true", help="log every HTTP request")
    ray = p.add_argument_group("Ray Serve scale-out (the [ray] extra)")
    ray.add_argument("--replicas", type=_positive(int),
                     help="run N replicas of this server behind Ray Serve's HTTP proxy (every replica loads the same "
                          "model and tasks; paths must be readable on every node)")
    ray.add_argument("--ray-address", help="the Ray cluster to join ('auto': the local node's cluster; default: "
                                           "start a local Ray)")
    return p


def build_server(args) -> PrefixServer:
    """The engine of parsed ``args``, with every ``--bank`` and ``--task`` loaded."""
    import transformers

    options = {} if args.num_labels is None else {"num_labels": args.num_labels}
    model = getattr(transformers, AUTO_CLASSES[args.output]).from_pretrained(args.model, **options)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = model.to(args.device, dtype)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        print(f"ptv2-serve: no tokenizer ({error}); only input_ids requests will be served", file=sys.stderr)
        tokenizer = None
    server = PrefixServer(model, args.prefix_len, tokenizer=tokenizer, max_tasks=args.max_tasks, layers=args.layers,
                          max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
                          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                          packed=False if args.padded else None, torch_compile=args.compile)
    for directory in args.bank:
        load_bank(server, directory)
    for name, path in args.task:
        load_task(server, name, path)
    return server


def http_settings(args):
    """The :class:`~ptv2_kernels.serving.http.HTTPSettings` of parsed ``args`` (API keys also from the env)."""
    from .http import HTTPSettings

    keys = list(args.api_key) + [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return HTTPSettings(api_keys=tuple(keys), max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
                        timeout_s=args.request_timeout_s, task_root=args.task_root)
