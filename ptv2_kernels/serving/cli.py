"""``ptv2-serve`` / ``python -m ptv2_kernels.serving``: load a model and task checkpoints, serve over HTTP."""

import argparse
import sys
from typing import List, Optional

import torch

from .checkpoints import load_bank, load_task
from .engine import PrefixServer
from .heads import EMBEDDING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from .http import PrefixHTTPServer

AUTO_CLASSES = {SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
                TOKEN_CLASSIFICATION: "AutoModelForTokenClassification", EMBEDDING: "AutoModel"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _task(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptv2-serve", description="Serve prefix-tuned (P-Tuning v2) tasks on one "
                                "frozen BERT/RoBERTa/DeBERTa over HTTP: POST /predict, GET /tasks.")
    p.add_argument("--model", required=True, help="transformers model directory or hub name (the frozen backbone)")
    p.add_argument("--output", choices=tuple(AUTO_CLASSES), default=SEQUENCE_CLASSIFICATION,
                   help="model head (default: sequence-classification)")
    p.add_argument("--num-labels", type=int, help="labels of the classification head (default: the model's)")
    p.add_argument("--prefix-len", type=int, required=True, help="P of every task")
    p.add_argument("--layers", type=int, nargs="+", help="prompt depth: prefixed layer indices (default: all)")
    p.add_argument("--task", type=_task, action="append", default=[], metavar="NAME=PATH",
                   help="a task checkpoint: save_prefix file, PEFT adapter directory or THUDM state dict (repeatable)")
    p.add_argument("--bank", action="append", default=[], metavar="DIR", help="a bank directory (save_bank)")
    p.add_argument("--max-tasks", type=int, default=16, help="task slots in the bank (default: 16)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="token budget per batch (default: 8192)")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests per batch (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batcher wait to fill a batch (default: 5)")
    p.add_argument("--padded", action="store_true",
                   help="pad batches instead of packing the sequences (DeBERTa is always padded)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (local only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free port")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
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
                          max_wait_ms=args.max_wait_ms, packed=False if args.padded else None)
    for directory in args.bank:
        load_bank(server, directory)
    for name, path in args.task:
        load_task(server, name, path)
    return server


def main(argv: Optional[List[str]] = None) -> int:
    """Serve until interrupted; prints ``serving on http://HOST:PORT`` once the port is bound."""
    args = parser().parse_args(argv)
    try:
        engine = build_server(args)
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"ptv2-serve: error: {error}", file=sys.stderr)
        return 2
    httpd = PrefixHTTPServer((args.host, args.port), engine, verbose=args.verbose)
    host, port = httpd.server_address[:2]
    print(f"serving on http://{host}:{port} tasks={engine.tasks()} packed={engine.packed}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()
    return 0
